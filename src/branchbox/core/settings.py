"""Settings of the in-process core. Pure data; the daemon fills it from its config file, env and flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from branchbox.backends.base import IdMap
from branchbox.core.pool import PoolConfig
from branchbox.limits import DEFAULT_DISK_MB
from branchbox.net.settings import NetworkSettings

DEFAULT_DATA_DIR = Path("/var/lib/branchbox")


def default_data_dir() -> Path:
    """``BRANCHBOX_DATA_DIR`` or /var/lib/branchbox."""
    return Path(os.environ.get("BRANCHBOX_DATA_DIR") or DEFAULT_DATA_DIR)


@dataclass(frozen=True, slots=True)
class WorkspaceSettings:
    """The git workspace cache (docs/workspaces.md)."""

    cache_budget_mb: int = 10240  # mirrors + commit layers above this are evicted, least recently used first
    ref_ttl: float = 0.0  # seconds a branch's resolved commit is reused without asking the server (0: always ask)
    git_timeout: float = 600.0  # seconds one git network operation may take
    default_depth: int = 1  # depth of the first fetch of a repository the cache has never seen
    allow_cidrs: tuple[str, ...] = ()  # blocked ranges git may fetch from anyway (workspaces/egress.py)
    # known_hosts file every ssh fetch checks host keys against, strictly (with a request's own known_hosts);
    # None: only a request's known_hosts, and without one the host key is not checked (workspaces/sshauth.py)
    ssh_known_hosts: Path | None = None


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    data_dir: Path = field(default_factory=default_data_dir)
    templates_dir: Path | None = None  # default: data_dir / "templates"
    default_timeout: float = 300.0  # seconds a sandbox lives when create() gets no timeout
    max_timeout: float = 86400.0
    max_sandboxes: int = 1000
    default_backend: str = "container"
    keep_sandboxes_on_shutdown: bool = True  # False: aclose() destroys every sandbox
    cgroup_parent: str = "branchbox"  # name of the parent cgroup (unique per daemon sharing a host)
    idmap: IdMap = field(default_factory=IdMap)  # the canonical range: template trees are owned in it on disk
    # per-sandbox ranges (issue 22.1): (first host uid, number of ranges of 65536 ids) of this daemon's block; each
    # container sandbox maps to a range of its own. None: every sandbox maps to ``idmap`` (the daemon claims a block)
    uid_ranges: tuple[int, int] | None = None
    agent_connect_timeout: float = 10.0
    tmp_tmpfs_mb: int = 0  # containers: 0 keeps /tmp in the sandbox's files; N mounts an N MiB tmpfs (no snapshots)
    default_disk_mb: int = DEFAULT_DISK_MB  # a sandbox's writable layer when create() names none (0: no limit)
    reserve_mb: int = 512  # free space of the data dir's filesystem kept for the daemon (creates refused below)
    snapshot_budget_mb: int = 0  # snapshot layers of this daemon together (0: no budget); snapshots refused above
    max_output_bytes: int = 64 << 20  # a foreground exec keeps at most this much of each stream (the rest dropped)
    pools: tuple[PoolConfig, ...] = ()  # warm pools started with the Manager (changeable live)
    network: NetworkSettings | None = None  # None: sandboxes get loopback only (docs/networking.md)
    workspaces: WorkspaceSettings = field(default_factory=WorkspaceSettings)

    @property
    def template_root(self) -> Path:
        return self.templates_dir or self.data_dir / "templates"
