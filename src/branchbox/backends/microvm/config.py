"""The microVM backend's settings from the environment (pure data; no backend import)."""

from __future__ import annotations

import os
from pathlib import Path

from branchbox.backends.microvm.backend import MicroVMConfig
from branchbox.errors import BackendError


def config_from_env(data_dir: Path) -> MicroVMConfig:
    """``BRANCHBOX_VM_CACHE`` (kernel, initrd, ext4 images; default ``DATA/vm``), ``BRANCHBOX_VM_TEMPLATED``
    (``0``: every create boots), ``BRANCHBOX_VM_POOL`` (QEMUs waiting in -incoming defer per memory template),
    ``BRANCHBOX_VM_TCG_ASLR`` (``1``/``0``: keep/drop guest address space randomisation under TCG; unset: keep
    it only on QEMU >= 10, see ``accel``),
    ``BRANCHBOX_VM_AGENT`` (``vsock`` | ``serial`` | ``auto``: the agent channel; auto = vsock when the host has
    vhost-vsock)."""
    cache = Path(os.environ.get("BRANCHBOX_VM_CACHE") or data_dir / "vm")
    channel = os.environ.get("BRANCHBOX_VM_AGENT") or "auto"
    if channel not in ("auto", "vsock", "serial"):
        raise BackendError(f"BRANCHBOX_VM_AGENT is {channel!r}: use vsock, serial or auto (vsock when available)")
    return MicroVMConfig(
        data_dir=data_dir,
        cache_dir=cache,
        templated=os.environ.get("BRANCHBOX_VM_TEMPLATED", "1") != "0",
        pool_size=int(os.environ.get("BRANCHBOX_VM_POOL", "1")),
        tcg_aslr={"1": True, "0": False}.get(os.environ.get("BRANCHBOX_VM_TCG_ASLR", "")),
        agent_channel=channel,
    )
