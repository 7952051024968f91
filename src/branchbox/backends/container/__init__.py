"""Container backend: user/mount/pid/uts/ipc/net/cgroup namespaces, overlayfs, cgroups v1+v2, seccomp.

``ContainerBackend`` is imported on first use so the zygote (``python -m
branchbox.backends.container.zygote``) does not load the daemon-side modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from branchbox.backends.container.backend import ContainerBackend

__all__ = ["ContainerBackend"]


def __getattr__(name: str) -> Any:
    if name == "ContainerBackend":
        from branchbox.backends.container.backend import ContainerBackend  # noqa: PLC0415

        return ContainerBackend
    raise AttributeError(name)
