"""Per-sandbox cgroups on cgroup v2 (unified) and v1 (one hierarchy per controller). Stdlib only.

Every sandbox gets one directory per hierarchy, named by its sandbox id, under a parent named ``parent``
(default ``branchbox``):

- v2: ``/sys/fs/cgroup/<parent>/<id>`` (under the root of the cgroup namespace), with memory/cpu/pids enabled
  in the subtree; limits in ``memory.max``, ``memory.swap.max``, ``cpu.max``, ``pids.max``; ``cgroup.freeze``
  and ``cgroup.kill``.
- v1: ``<mount of controller>/<own cgroup of this process>/<parent>/<id>`` for memory, cpu, pids and freezer
  (nested under our own path so an outer memory limit still applies); limits in ``memory.limit_in_bytes``
  (+ ``memory.memsw.limit_in_bytes``), ``cpu.cfs_quota_us``/``cfs_period_us``, ``pids.max``;
  ``freezer.state``.
  Kill is freeze, SIGKILL every pid, thaw.

Work made ahead of demand (spare shells, warm pool refills) runs in an *idle* cgroup (``cpu.idle``, both
versions, Linux 5.15+; older kernels: the lowest ``cpu.shares``/``cpu.weight``), so the sandboxes next to it win
the CPU. A nice value would not do that: it ranks tasks within one cgroup, and every sandbox has a cgroup of its
own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path

CPU_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "cpu", "pids", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "pids")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _own_paths() -> dict[str, str]:
    """Controller (or "" for the unified hierarchy) -> this process's cgroup path."""
    out: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _v1_mounts() -> dict[str, Path]:
    """Controller -> mount point of its v1 hierarchy."""
    out: dict[str, Path] = {}
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        pre, _, post = line.partition(" - ")
        fields = post.split()
        if len(fields) < 3 or fields[0] != "cgroup":
            continue
        mount_point = Path(pre.split()[4])
        for opt in fields[2].split(","):
            if opt in V1_CONTROLLERS:
                out.setdefault(opt, mount_point)
    return out


class Cgroups:
    """The cgroups of every sandbox on one host. Build with :func:`detect`."""

    version: int
    weight: tuple[str, int, int]  # without cpu.idle (before Linux 5.15): the weight file, its lowest, its default

    def __init__(self, parents: dict[str, Path]) -> None:
        self.parents = parents  # hierarchy key -> parent directory (key is a controller, or "unified")

    def dirs(self, sandbox_id: str) -> dict[str, Path]:
        return {k: p / sandbox_id for k, p in self.parents.items()}

    def ensure_parents(self) -> None:
        for p in self.parents.values():
            p.mkdir(parents=True, exist_ok=True)

    def create(self, sandbox_id: str, cpu: float, memory_mb: int, pids: int, *, idle: bool = False) -> dict[str, Path]:
        """Make the sandbox's directory in every hierarchy and write its limits (``idle``: see :meth:`set_idle`)."""
        dirs = self.dirs(sandbox_id)
        made: list[Path] = []
        try:
            for d in dirs.values():
                d.mkdir()
                made.append(d)
            self.set_limits(sandbox_id, cpu, memory_mb, pids)
            if idle:
                self.set_idle(sandbox_id, idle=True)
        except OSError:
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        return dirs

    def set_limits(self, sandbox_id: str, cpu: float, memory_mb: int, pids: int) -> None:
        raise OSError(errno.ENOSYS, "abstract")  # pragma: no cover

    def adopt(
        self, spare: str, sandbox_id: str, pid: int, cpu: float, memory_mb: int, pids: int, *, idle: bool = False
    ) -> dict[str, Path]:
        """Give the cgroups of a spare (whose only process is ``pid``) to ``sandbox_id``, with its limits; idle
        (:meth:`set_idle`) only if ``idle``."""
        raise OSError(errno.ENOSYS, "abstract")  # pragma: no cover

    def cpu_dir(self, sandbox_id: str) -> Path | None:
        """The sandbox's directory in the hierarchy of the cpu controller; None when it has none."""
        raise OSError(errno.ENOSYS, "abstract")  # pragma: no cover

    def set_idle(self, sandbox_id: str, *, idle: bool) -> None:
        """Run the sandbox's processes at the lowest CPU priority next to other cgroups (``idle``), or as any
        sandbox. Best effort: a host without the cpu controller, or that refuses the write, keeps the default."""
        d = self.cpu_dir(sandbox_id)
        if d is None:
            return
        with contextlib.suppress(OSError):
            try:
                _write(d / "cpu.idle", "1" if idle else "0")
            except FileNotFoundError:  # before Linux 5.15: the lowest weight instead
                name, low, default = self.weight
                _write(d / name, str(low if idle else default))

    def is_idle(self, sandbox_id: str) -> bool:
        """Whether :meth:`set_idle` made the sandbox idle (False without the cpu controller)."""
        d = self.cpu_dir(sandbox_id)
        if d is None:
            return False
        try:
            return _read(d / "cpu.idle").strip() == "1"
        except FileNotFoundError:
            name, low, _ = self.weight
            return int(_read(d / name)) == low

    def join(self, sandbox_id: str, pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into every hierarchy of the sandbox."""
        for d in self.dirs(sandbox_id).values():
            _write(d / "cgroup.procs", str(pid))

    def pids(self, sandbox_id: str) -> list[int]:
        found: set[int] = set()
        for d in self.dirs(sandbox_id).values():
            with contextlib.suppress(FileNotFoundError):
                found.update(int(x) for x in _read(d / "cgroup.procs").split())
        return sorted(found)

    def freeze(self, sandbox_id: str) -> None:
        raise OSError(errno.ENOSYS, "abstract")  # pragma: no cover

    def thaw(self, sandbox_id: str) -> None:
        raise OSError(errno.ENOSYS, "abstract")  # pragma: no cover

    def is_frozen(self, sandbox_id: str) -> bool:
        raise OSError(errno.ENOSYS, "abstract")  # pragma: no cover

    def kill(self, sandbox_id: str) -> None:
        """SIGKILL every process of the sandbox (returns before they are all gone)."""
        raise OSError(errno.ENOSYS, "abstract")  # pragma: no cover

    def remove(self, sandbox_id: str) -> bool:
        """rmdir every directory of the sandbox; True when none is left (False: processes still exiting)."""
        left = False
        for d in self.dirs(sandbox_id).values():
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                left = True
        return not left

    def exists(self, sandbox_id: str) -> bool:
        return any(d.is_dir() for d in self.dirs(sandbox_id).values())

    def list_ids(self) -> set[str]:
        out: set[str] = set()
        for p in self.parents.values():
            with contextlib.suppress(FileNotFoundError):
                out.update(e.name for e in os.scandir(p) if e.is_dir(follow_symlinks=False))
        return out

    def _kill_listed(self, sandbox_id: str) -> None:
        for pid in self.pids(sandbox_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class CgroupsV2(Cgroups):
    version = 2
    weight = ("cpu.weight", 1, 100)

    def __init__(self, root: Path, parent: str) -> None:
        super().__init__({"unified": root / parent})
        self.root = root

    @property
    def parent(self) -> Path:
        return self.parents["unified"]

    def available(self, path: Path) -> set[str]:
        try:
            return set(_read(path / "cgroup.controllers").split())
        except FileNotFoundError:
            return set()

    def ensure_parents(self) -> None:
        wanted = [c for c in V2_CONTROLLERS if c in self.available(self.root)]
        if wanted:
            # The root is exempt from the no-internal-processes rule; a busy non-root may refuse
            # (then the limits below are not written).
            with contextlib.suppress(OSError):
                _write(self.root / "cgroup.subtree_control", " ".join("+" + c for c in wanted))
        self.parent.mkdir(exist_ok=True)
        wanted = [c for c in V2_CONTROLLERS if c in self.available(self.parent)]
        if wanted:
            _write(self.parent / "cgroup.subtree_control", " ".join("+" + c for c in wanted))

    def set_limits(self, sandbox_id: str, cpu: float, memory_mb: int, pids: int) -> None:
        d = self.parent / sandbox_id
        have = self.available(d)
        if "memory" in have:
            _write(d / "memory.max", str(memory_mb * 1024 * 1024))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
        if "cpu" in have and cpu > 0:
            _write(d / "cpu.max", f"{int(cpu * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        if "pids" in have:
            _write(d / "pids.max", str(pids))

    def cpu_dir(self, sandbox_id: str) -> Path | None:
        d = self.parent / sandbox_id
        return d if "cpu" in self.available(d) else None

    def adopt(
        self, spare: str, sandbox_id: str, pid: int, cpu: float, memory_mb: int, pids: int, *, idle: bool = False
    ) -> dict[str, Path]:
        """cgroup2 forbids renaming: make the sandbox's cgroup and move the spare's process into it."""
        dirs = self.create(sandbox_id, cpu, memory_mb, pids, idle=idle)
        try:
            self.join(sandbox_id, pid)
        except OSError:
            self.remove(sandbox_id)
            raise
        self.remove(spare)
        return dirs

    def freeze(self, sandbox_id: str) -> None:
        _write(self.parent / sandbox_id / "cgroup.freeze", "1")

    def thaw(self, sandbox_id: str) -> None:
        _write(self.parent / sandbox_id / "cgroup.freeze", "0")

    def is_frozen(self, sandbox_id: str) -> bool:
        for line in _read(self.parent / sandbox_id / "cgroup.events").splitlines():
            key, _, value = line.partition(" ")
            if key == "frozen":
                return value.strip() == "1"
        return False

    def kill(self, sandbox_id: str) -> None:
        d = self.parent / sandbox_id
        if not d.is_dir():
            return
        try:
            _write(d / "cgroup.kill", "1")
        except FileNotFoundError:  # kernels before 5.14
            self.freeze(sandbox_id)
            self._kill_listed(sandbox_id)
            self.thaw(sandbox_id)


class CgroupsV1(Cgroups):
    version = 1
    weight = ("cpu.shares", 2, 1024)

    def set_limits(self, sandbox_id: str, cpu: float, memory_mb: int, pids: int) -> None:
        dirs = self.dirs(sandbox_id)
        if "memory" in dirs:
            limit = str(memory_mb * 1024 * 1024)
            memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
            has_memsw = memsw.exists()
            if has_memsw:  # memsw may never be below the memory limit: order the writes by direction
                try:
                    _write(memsw, limit)
                    _write(dirs["memory"] / "memory.limit_in_bytes", limit)
                except OSError:
                    _write(dirs["memory"] / "memory.limit_in_bytes", limit)
                    _write(memsw, limit)
            else:
                _write(dirs["memory"] / "memory.limit_in_bytes", limit)
        if "cpu" in dirs and cpu > 0:
            _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(dirs["cpu"] / "cpu.cfs_quota_us", str(int(cpu * CPU_PERIOD_US)))
        if "pids" in dirs:
            _write(dirs["pids"] / "pids.max", str(pids))

    def cpu_dir(self, sandbox_id: str) -> Path | None:
        return self.dirs(sandbox_id).get("cpu")

    def adopt(
        self, spare: str, sandbox_id: str, pid: int, cpu: float, memory_mb: int, pids: int, *, idle: bool = False
    ) -> dict[str, Path]:
        """v1 renames the spare's directories (no process moves: moving one costs a synchronize_rcu)."""
        done: list[tuple[Path, Path]] = []
        try:
            for key, new in self.dirs(sandbox_id).items():
                old = self.parents[key] / spare
                os.rename(old, new)
                done.append((old, new))
            self.set_limits(sandbox_id, cpu, memory_mb, pids)
            self.set_idle(sandbox_id, idle=idle)  # the spare's directories were idle
        except OSError:
            for old, new in reversed(done):
                with contextlib.suppress(OSError):
                    os.rename(new, old)
            raise
        return self.dirs(sandbox_id)

    def _freezer(self, sandbox_id: str) -> Path | None:
        p = self.parents.get("freezer")
        return None if p is None else p / sandbox_id

    def freeze(self, sandbox_id: str) -> None:
        f = self._freezer(sandbox_id)
        if f is None:
            raise OSError(errno.ENOTSUP, "no v1 freezer hierarchy is mounted")
        _write(f / "freezer.state", "FROZEN")

    def thaw(self, sandbox_id: str) -> None:
        f = self._freezer(sandbox_id)
        if f is None:
            raise OSError(errno.ENOTSUP, "no v1 freezer hierarchy is mounted")
        _write(f / "freezer.state", "THAWED")

    def is_frozen(self, sandbox_id: str) -> bool:
        f = self._freezer(sandbox_id)
        return f is not None and _read(f / "freezer.state").strip() == "FROZEN"

    def kill(self, sandbox_id: str) -> None:
        f = self._freezer(sandbox_id)
        if f is None or not f.is_dir():
            self._kill_listed(sandbox_id)
            return
        # Frozen processes cannot fork while we collect them; SIGKILL is delivered on thaw. The cgroup may be
        # removed meanwhile by another remover (ENOENT, or ENODEV from a file of a removed directory): then
        # nothing is left to kill.
        try:
            self.freeze(sandbox_id)
            try:
                self._kill_listed(sandbox_id)
            finally:
                self.thaw(sandbox_id)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise


def detect(parent: str = "branchbox", *, cgroup_root: Path = Path("/sys/fs/cgroup")) -> Cgroups:
    """The cgroup layout of this host: v2 when the unified hierarchy holds the controllers, else v1."""
    if (cgroup_root / "cgroup.controllers").exists():
        return CgroupsV2(cgroup_root, parent)
    own = _own_paths()
    parents: dict[str, Path] = {}
    for ctrl, mount_point in _v1_mounts().items():
        rel = own.get(ctrl, "/").lstrip("/")
        parents[ctrl] = mount_point / rel / parent if rel else mount_point / parent
    if not parents:
        raise OSError(errno.ENOENT, "no cgroup v2 controllers and no cgroup v1 hierarchy is mounted")
    return CgroupsV1(parents)
