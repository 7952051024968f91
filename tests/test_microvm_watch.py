"""A directory watch in a microVM guest: the guest's agent (its own python3, from the initrd's copy of the agent
package) watches with inotify through ctypes, as a container's does."""

from __future__ import annotations

import asyncio

from branchbox.core.manager import Manager
from tests import test_microvm

pytestmark = test_microvm.pytestmark
# the microVM tests' fixtures (their image cache, data dir and Manager, with the leftovers check)
_vm_env = test_microvm._vm_env
vm_data_dir = test_microvm.vm_data_dir
vmm = test_microvm.vmm


async def test_watch_in_a_microvm(vmm: Manager) -> None:
    info = await vmm.create(template="default", backend="microvm", memory_mb=256)
    w = await vmm.watch_dir(info.id, "/root", recursive=True)
    try:
        await vmm.exec(info.id, "mkdir -p /root/a/b && echo x > /root/a/b/f && mv /root/a /root/c && rm -r /root/c")
        seen: list[tuple[str, str]] = []
        async with asyncio.timeout(60):
            while ("remove", "c") not in seen:
                e = await anext(w)
                seen.append((e.type, e.name))
        assert ("create", "a/b/f") in seen and ("rename", "a") in seen and ("create", "c") in seen
        assert seen.index(("create", "a")) < seen.index(("rename", "a")) < seen.index(("remove", "c"))
    finally:
        await w.aclose()
        await vmm.destroy(info.id)
