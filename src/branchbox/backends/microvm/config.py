"""The microVM backend's settings from the environment (pure data; no backend import)."""

from __future__ import annotations

import os
from pathlib import Path

from branchbox.backends.microvm.backend import MicroVMConfig
from branchbox.backends.microvm.jail import UID_BASE, UID_COUNT, JailConfig
from branchbox.errors import BackendError


def config_from_env(data_dir: Path, *, cgroup_parent: str = "branchbox") -> MicroVMConfig:
    """``BRANCHBOX_VM_CACHE`` (kernel, initrd, ext4 images; default ``DATA/vm``), ``BRANCHBOX_VM_TEMPLATED``
    (``0``: every create boots), ``BRANCHBOX_VM_POOL`` (QEMUs waiting in -incoming defer per memory template),
    ``BRANCHBOX_VM_TCG_ASLR`` (``1``/``0``: keep/drop guest address space randomisation under TCG; unset: keep
    it only on QEMU >= 10, see ``accel``),
    ``BRANCHBOX_VM_AGENT`` (``vsock`` | ``serial`` | ``auto``: the agent channel; auto = vsock when the host has
    vhost-vsock), ``BRANCHBOX_VM_UIDS`` (``BASE:COUNT``: the host uids QEMU processes run as, one per VM),
    ``BRANCHBOX_VM_JAIL`` (``0``: QEMU runs as the daemon's user, in its cgroup and mount namespace; for debugging
    and measuring only). The VMs' cgroups go under ``<cgroup_parent>-vm``."""
    cache = Path(os.environ.get("BRANCHBOX_VM_CACHE") or data_dir / "vm")
    channel = os.environ.get("BRANCHBOX_VM_AGENT") or "auto"
    if channel not in ("auto", "vsock", "serial"):
        raise BackendError(f"BRANCHBOX_VM_AGENT is {channel!r}: use vsock, serial or auto (vsock when available)")
    base, count = _uid_range(os.environ.get("BRANCHBOX_VM_UIDS") or f"{UID_BASE}:{UID_COUNT}")
    jail = JailConfig(enabled=os.environ.get("BRANCHBOX_VM_JAIL", "1") != "0", uid_base=base, uid_count=count,
                      cgroup_parent=f"{cgroup_parent}-vm")  # fmt: skip
    return MicroVMConfig(
        data_dir=data_dir,
        cache_dir=cache,
        templated=os.environ.get("BRANCHBOX_VM_TEMPLATED", "1") != "0",
        pool_size=int(os.environ.get("BRANCHBOX_VM_POOL", "1")),
        tcg_aslr={"1": True, "0": False}.get(os.environ.get("BRANCHBOX_VM_TCG_ASLR", "")),
        agent_channel=channel,
        jail=jail,
    )


def _uid_range(text: str) -> tuple[int, int]:
    try:
        base, count = (int(x) for x in text.split(":"))
    except ValueError:
        base = count = 0
    if base < 1 or count < 1 or base + count > 2**31:
        raise BackendError(f"BRANCHBOX_VM_UIDS is {text!r}: use BASE:COUNT, unused host uids from BASE (>= 1) "
                           "below 2**31")  # fmt: skip
    return base, count
