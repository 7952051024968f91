"""The container backend: Linux namespaces + overlayfs + cgroups, booted by a forking zygote.

The daemon never forks itself (it is multi-threaded): :meth:`ContainerBackend.start` spawns the zygote
(:mod:`branchbox.backends.container.zygote`) and every boot is one request to it over a SOCK_SEQPACKET socket.
Teardown (kill, cgroup removal) happens here, found by sandbox id, so it works after a daemon restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import branchbox.backends.container.cgroups as cg_mod
import branchbox.backends.container.syscalls as syscalls
from branchbox.backends.base import BootSpec, Capabilities, IdMap, SandboxHandle
from branchbox.backends.container.child import SHELL_DIR
from branchbox.backends.container.zygote import AGENT_SOCKET, MAX_MESSAGE, MAX_SPARES, SPARE_PREFIX
from branchbox.backends.idranges import CANONICAL_BASE, IdRanges
from branchbox.backends.process import wait_pid_exit
from branchbox.errors import BackendError, LimitExceededError, TimeoutError_
from branchbox.timing import PhaseTimer

PAUSE_TIMEOUT_S = 10.0
BACKGROUND_NICE = 10  # pool refills: nice 10 in an idle cgroup (cgroups.set_idle), so they yield to users' work
DESTROY_TIMEOUT_S = 10.0
ZYGOTE_START_TIMEOUT_S = 30.0
SPARE_OWNER = "zygote"  # the holder of the ranges lent to the zygote for spare shells


class ContainerBackend:
    """Sandboxes as unprivileged containers (user, mount, pid, uts, ipc, net and cgroup namespaces)."""

    name = "container"
    capabilities = Capabilities(pause=True, fs_snapshot=True, fork=True, memory_snapshot=False, network=True)

    def __init__(
        self,
        run_root: Path,
        *,
        cgroup_parent: str = "branchbox",
        idmap: IdMap | None = None,
        tmp_tmpfs_mb: int = 0,
        ids: IdRanges | None = None,
    ) -> None:
        self.run_root = Path(run_root)
        self.tmp_tmpfs_mb = tmp_tmpfs_mb  # 0: /tmp is part of the sandbox's files; else a tmpfs of this size
        self.cgroup_parent = cgroup_parent
        self.idmap = idmap or IdMap()  # without ``ids``: the one range every sandbox (and spare shell) maps to
        # per-sandbox ranges (issue 22.1): ``ids`` hands them out; ``_lent`` are the ranges of the zygote's spare
        # shells (oldest first: the likeliest to be ready), ``_lend`` the range lent in place of a claimed one
        self.ids = ids
        self._lent: list[int] = []
        self._lend: dict[str, int] = {}
        self._cgroups: cg_mod.Cgroups | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._sockets: dict[str, Path] = {}
        self.zygote_info: dict[str, Any] = {}

    # -- zygote --------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.run_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_root, 0o700)
        try:
            self._cgroups = cg_mod.detect(self.cgroup_parent)
        except OSError as exc:
            raise BackendError(f"container backend: {exc}; mount cgroup2 or the v1 controllers") from exc
        await self._ensure_zygote()

    async def _ensure_zygote(self) -> None:
        async with self._lock:
            if self._proc is not None and self._proc.poll() is None and self._sock is not None:
                return
            await self._stop_zygote()
            await self._spawn_zygote()

    async def _spawn_zygote(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.ids is not None:
            # a new zygote's spares take the ranges of the old one's (those died with it; a respawn lends the
            # same ranges again), topped up to MAX_SPARES
            with contextlib.suppress(LimitExceededError):  # a full block: fewer spares
                while len(self._lent) < MAX_SPARES:
                    self._lent.append(self.ids.take(SPARE_OWNER))
        spare_ranges = None if self.ids is None else list(self._lent)
        try:
            self._proc = _popen_zygote(
                theirs, self.run_root / "zygote.log", self.cgroup_parent, self.idmap, spare_ranges
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(ZYGOTE_START_TIMEOUT_S):
                raw = await loop.sock_recv(ours, MAX_MESSAGE)
        except TimeoutError as exc:
            ours.close()
            raise BackendError("container backend: the zygote did not start; see zygote.log in run_root") from exc
        ready = json.loads(raw) if raw else {"ok": False, "error": "exited at start; see zygote.log in run_root"}
        if not ready.get("ok"):
            ours.close()
            raise BackendError(f"container backend: zygote failed: {ready.get('error')}")
        self.zygote_info = ready
        self._sock = ours
        await self._remove_stale_spares()
        self._reader = asyncio.create_task(self._read_replies(ours), name="branchbox-zygote-reader")

    async def _read_replies(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while raw := await loop.sock_recv(sock, MAX_MESSAGE):
                reply = json.loads(raw)
                fut = self._pending.pop(reply.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
                elif reply.get("ok"):  # the caller gave up (cancelled): do not leak the sandbox
                    await self.destroy(reply["sandbox_id"], None)
        except OSError:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(BackendError("container backend: the zygote exited during a boot"))
            self._pending.clear()
            if self._sock is sock:
                self._sock = None
                sock.close()

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        await self._ensure_zygote()
        sock = self._sock
        assert sock is not None
        req_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            await asyncio.get_running_loop().sock_sendall(sock, json.dumps({**request, "id": req_id}).encode())
            return await fut
        finally:
            self._pending.pop(req_id, None)

    async def _stop_zygote(self) -> None:
        sock, self._sock = self._sock, None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if sock is not None:
            sock.close()
        if self._proc is not None:
            proc, self._proc = self._proc, None
            await asyncio.to_thread(proc.wait)

    async def aclose(self) -> None:
        await self._stop_zygote()
        if self._cgroups is not None:
            for parent in self._cgroups.parents.values():
                await _remove_parent_cgroup(parent)

    @property
    def zygote_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _cg(self) -> cg_mod.Cgroups:
        if self._cgroups is None:
            raise BackendError("container backend: call start() first")
        return self._cgroups

    # -- lifecycle -----------------------------------------------------------------------------------
    def choose_idmap(self, sandbox_id: str) -> IdMap:
        """The range ``sandbox_id`` boots in: the oldest range lent for a spare shell (its spare is likely ready;
        the boot lends a fresh range in its place), else a fresh one. Without ranges: the one shared range."""
        if self.ids is None:
            return self.idmap
        if not self._lent:
            return IdMap(self.ids.take(sandbox_id), self.idmap.count)
        base = self._lent.pop(0)
        self.ids.transfer(base, sandbox_id)
        try:
            self._lend[sandbox_id] = fresh = self.ids.take(SPARE_OWNER)
            self._lent.append(fresh)
        except LimitExceededError:
            pass  # none free: one spare fewer
        return IdMap(base, self.idmap.count)

    def prepare_idmaps(self, src_base: int, count: int) -> asyncio.Task[dict[str, Any]] | None:
        """Have the zygote make, in the background, the idmappings from range ``src_base`` (a parent about to be
        forked) to the ranges the next ``count`` boots will take (a fork's children: they read the parent's layer
        idmapped). Runs while the parent is captured; a boot that comes first makes its own."""
        if self.ids is None or not self._lent:
            return None
        pairs = [[src_base, dst] for dst in self._lent[:count] if dst != src_base]

        async def ahead() -> dict[str, Any]:
            try:
                return await self._call({"op": "idmap", "pairs": pairs})
            except (BackendError, OSError) as exc:  # only a head start: the boots make what is missing
                return {"ok": False, "error": str(exc)}

        return asyncio.create_task(ahead())

    async def boot(self, spec: BootSpec, timer: PhaseTimer) -> SandboxHandle:
        req = {
            "sandbox_id": spec.sandbox_id,
            "layers": [str(p) for p in spec.layers],
            "upper_dir": str(spec.upper_dir),
            "work_dir": str(spec.work_dir),
            "run_dir": str(spec.run_dir),
            "hostname": spec.hostname,
            "cpu": spec.resources.cpu,
            "memory_mb": spec.resources.memory_mb,
            "pids": spec.resources.pids,
            "uid_base": spec.idmap.host_base,
            "id_count": spec.idmap.count,
            "layer_bases": [int(b) for b in spec.layer_bases],
            "spare_uid_base": self._lend.pop(spec.sandbox_id, 0),
            # no_new_privs only while every sandbox shares one range (a setuid root there is every sandbox's root)
            "no_new_privs": self.ids is None or spec.idmap == self.idmap,
            "workdir": spec.workdir,
            "env": dict(spec.env),
            "network": spec.network,
            "nice": BACKGROUND_NICE if spec.background else 0,
            "tmp_tmpfs_mb": self.tmp_tmpfs_mb,
        }
        if not spec.layers:
            raise BackendError(f"boot of {spec.sandbox_id}: no lower layers given")
        t0 = time.perf_counter()
        reply = await self._call({"op": "boot", "req": req})
        wall_ms = (time.perf_counter() - t0) * 1000
        phases: dict[str, float] = reply.get("phases") or {}
        for name, ms in phases.items():
            timer.add(name, ms)
        timer.add("zygote_rtt", max(0.0, wall_ms - sum(phases.values())))
        if not reply.get("ok"):
            raise BackendError(
                f"boot of {spec.sandbox_id} failed at step {reply.get('step')!r}: {reply.get('error')}",
                sandbox_id=spec.sandbox_id,
                step=reply.get("step"),
            )
        sock_path = spec.run_dir / AGENT_SOCKET
        self._sockets[spec.sandbox_id] = sock_path
        return SandboxHandle(
            sandbox_id=spec.sandbox_id,
            pid=int(reply["pid"]),
            pid_start_time=int(reply["start_time"]),
            agent_socket=sock_path,
            extra={f"cgroup.{k}": v for k, v in reply.get("cgroups", {}).items()},
        )

    async def zygote_status(self) -> dict[str, Any]:
        """The zygote's spare shells (ready, being made) and boots in flight."""
        return await self._call({"op": "status"})

    def is_alive(self, handle: SandboxHandle) -> bool:
        try:
            with open(f"/proc/{handle.pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            return False
        fields = raw[raw.rindex(b")") + 2 :].split()
        return fields[0] not in (b"Z", b"X") and int(fields[19]) == handle.pid_start_time

    async def wait_exit(self, handle: SandboxHandle) -> None:
        await wait_pid_exit(handle.pid, lambda: self.is_alive(handle))

    def foreground(self, handle: SandboxHandle) -> None:
        """Back to nice 0 in a cgroup that is not idle: an idle pool member has only its agent, whose children
        inherit its priority."""
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, handle.pid, 0)
        if self._cgroups is not None:
            self._cgroups.set_idle(handle.sandbox_id, idle=False)

    def set_hostname(self, handle: SandboxHandle, hostname: str) -> None:
        """Rename a running sandbox (used when a warm sandbox is claimed): syscalls only, no process."""
        if not self.is_alive(handle):
            raise BackendError(f"sandbox {handle.sandbox_id} is not running")
        syscalls.set_hostname_of(handle.pid, hostname)

    async def pause(self, handle: SandboxHandle) -> None:
        await self._set_frozen(handle.sandbox_id, frozen=True)

    async def resume(self, handle: SandboxHandle) -> None:
        await self._set_frozen(handle.sandbox_id, frozen=False)

    async def _set_frozen(self, sandbox_id: str, *, frozen: bool) -> None:
        cg = self._cg()
        try:
            if frozen:
                cg.freeze(sandbox_id)
            else:
                cg.thaw(sandbox_id)
            # The freezer reports completion only through its state file (v1 has no notification): re-read it.
            deadline = time.monotonic() + PAUSE_TIMEOUT_S
            while cg.is_frozen(sandbox_id) != frozen:
                if time.monotonic() > deadline:
                    raise TimeoutError_(f"sandbox {sandbox_id}: freezer did not settle in {PAUSE_TIMEOUT_S} s")
                await asyncio.sleep(0.001)
        except FileNotFoundError as exc:
            raise BackendError(f"sandbox {sandbox_id} has no cgroup: it is not running") from exc

    async def destroy(self, sandbox_id: str, handle: SandboxHandle | None) -> None:
        cg = self._cg()
        deadline = time.monotonic() + DESTROY_TIMEOUT_S
        if cg.exists(sandbox_id):
            cg.kill(sandbox_id)
        if handle is not None and self.is_alive(handle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
            async with asyncio.timeout(DESTROY_TIMEOUT_S):
                await self.wait_exit(handle)
        while not cg.remove(sandbox_id):
            if time.monotonic() > deadline:
                raise BackendError(
                    f"sandbox {sandbox_id}: processes did not exit after SIGKILL", pids=cg.pids(sandbox_id)
                )
            cg.kill(sandbox_id)
            await asyncio.sleep(0.002)  # killed processes are still exiting (teardown, off the hot path)
        sock = handle.agent_socket if handle is not None else self._sockets.get(sandbox_id)
        self._sockets.pop(sandbox_id, None)
        if sock is not None:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        orphans = sorted(i for i in self._cg().list_ids() - keep if not i.startswith(SPARE_PREFIX))
        for sandbox_id in orphans:
            await self.destroy(sandbox_id, None)
        await self._remove_stale_spares()
        return orphans

    async def _remove_stale_spares(self) -> None:
        """Cgroups of spare shells of a zygote that is gone (killed: its shells died with it)."""
        live = f"{SPARE_PREFIX}{self.zygote_pid}-"
        for name in self._cg().list_ids():
            if name.startswith(SPARE_PREFIX) and not name.startswith(live):
                with contextlib.suppress(BackendError):
                    await self.destroy(name, None)


def _popen_zygote(
    sock: socket.socket, log_path: Path, parent: str, idmap: IdMap, spare_ranges: list[int] | None
) -> subprocess.Popen[bytes]:
    """Spawn the zygote (once per backend start; not on the boot path)."""
    src = str(Path(__file__).resolve().parents[3])  # src/, holding the branchbox package
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "branchbox.backends.container.zygote", "--fd", str(sock.fileno())]
    with open(log_path, "ab") as log:
        args = ["--parent", parent, "--id-base", str(idmap.host_base), "--id-count", str(idmap.count)]
        if spare_ranges is not None:
            args += ["--spare-ranges", ",".join(map(str, spare_ranges)), "--canonical-base", str(CANONICAL_BASE)]
        return subprocess.Popen(
            [*cmd, *args, "--shell-dir", str(log_path.parent / SHELL_DIR)],
            pass_fds=(sock.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,  # terminal signals to the daemon must not reach the zygote
        )


async def _remove_parent_cgroup(parent: Path) -> None:
    """Remove our parent cgroup unless sandboxes still live in it (they keep running, re-attached later).

    cgroup v1 releases a removed child asynchronously, so the parent can be busy for a moment after the last
    sandbox went: retry briefly (shutdown path only)."""
    for _ in range(500):  # up to 5 s
        try:
            os.rmdir(parent)  # cgroupfs: an instant syscall
            return
        except FileNotFoundError:
            return
        except OSError:
            with os.scandir(parent) as entries:
                if any(e.is_dir() for e in entries):
                    return  # sandboxes still live in it
            await asyncio.sleep(0.01)
