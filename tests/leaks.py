"""Counts what sandboxes leave on the host: mounts, cgroups, processes, daemon fds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(parent_name: str, *, spares: bool = False) -> set[str]:
    """Cgroup directories under our parent; the zygote's spare shells (made ahead, any time) only if ``spares``."""
    found: set[str] = set()
    # os.walk skips directories removed while it walks (the zygote makes and removes shells at any time), where
    # Path.rglob raised FileNotFoundError
    for top, dirs, _ in os.walk(CGROUP_ROOT):
        if Path(top).name == parent_name:
            for inner, subdirs, _ in os.walk(top):
                paths = (f"{inner}/{d}" for d in subdirs)
                found.update(p for p in paths if spares or "/shell-" not in p)
            dirs.clear()
    return found


# Filesystems that tests mount on purpose: fixtures' loop filesystems for a whole module, a test's own "mnt-*"
# (other workers mount them at any time).
FIXTURE_MOUNTS = ("btrfs-", "prep-", "mnt-")


def _mounts(*roots: str) -> frozenset[str]:
    """Mount points in the tests' areas of the host (where a leak of ours would be: the test root, and ``roots``),
    without the fixtures' own loop filesystems; mounts elsewhere come and go with other programs."""
    areas = (os.environ.get("BRANCHBOX_TEST_ROOT", "/var/tmp/branchbox-test"), *roots)
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ", 5)[4]
        inside = any(point == a or point.startswith(a.rstrip("/") + "/") for a in areas)
        if inside and not Path(point).name.startswith(FIXTURE_MOUNTS):
            out.add(point)
    return frozenset(out)


def _processes() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


@dataclass(frozen=True)
class HostSnapshot:
    mounts: frozenset[str]
    cgroups: frozenset[str]
    fds: int
    processes: frozenset[int]
    parent: str

    @classmethod
    def take(cls, cgroup_parent: str) -> HostSnapshot:
        return cls(
            mounts=_mounts(),
            cgroups=frozenset(_cgroup_dirs(cgroup_parent)),
            fds=len(os.listdir("/proc/self/fd")),
            processes=frozenset(_processes()),
            parent=cgroup_parent,
        )

    def assert_same(self, before: HostSnapshot) -> None:
        assert self.mounts <= before.mounts, f"host mounts leaked: {sorted(self.mounts - before.mounts)[:5]}"
        assert self.cgroups == before.cgroups, f"cgroups leaked: {sorted(self.cgroups - before.cgroups)[:5]}"
        assert self.fds <= before.fds + 2, f"fds leaked: {before.fds} -> {self.fds}"
        new = self.processes - before.processes
        # processes of other tests may come and go; ours are children of the zygote or in our cgroups
        leaked = [p for p in new if _in_cgroup_tree(p, self.parent, spares=False)]
        assert not leaked, f"sandbox processes leaked: {leaked}"

    def assert_no_cgroups(self) -> None:
        left = _cgroup_dirs(self.parent, spares=True)  # spare shells too: they go when the backend closes
        assert not left, f"cgroups left: {sorted(left)[:5]}"


def _in_cgroup_tree(pid: int, parent_name: str, *, spares: bool = True) -> bool:
    """True when ``pid`` is in a cgroup under our parent (in a spare shell's too, unless ``spares`` is False)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return f"/{parent_name}/" in text and (spares or f"/{parent_name}/shell-" not in text)
