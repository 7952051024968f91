"""branchbox: sandboxes for AI agents that start in milliseconds and fork copy-on-write.

In-process core::

    from branchbox import Manager
    async with Manager.open("/var/lib/branchbox") as m:
        sbx = await m.create(template="default")

Over HTTP (a running ``branchbox serve``)::

    from branchbox import Sandbox
    sbx = Sandbox.create()

Heavy modules are imported on first use, so ``import branchbox`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from branchbox._version import VERSION as __version__
from branchbox.errors import BranchboxError

_LAZY = {
    "Manager": "branchbox.core.manager",
    "ManagerSettings": "branchbox.core.settings",
    "Sandbox": "branchbox.sdk",
    "AsyncSandbox": "branchbox.sdk",
    "Template": "branchbox.sdk",
    "AsyncTemplate": "branchbox.sdk",
    "explore": "branchbox.sdk",
    "aexplore": "branchbox.sdk",
}

__all__ = [
    "AsyncSandbox",
    "AsyncTemplate",
    "BranchboxError",
    "Manager",
    "ManagerSettings",
    "Sandbox",
    "Template",
    "__version__",
    "aexplore",
    "explore",
]

if TYPE_CHECKING:
    from branchbox.core.manager import Manager
    from branchbox.core.settings import ManagerSettings
    from branchbox.sdk import AsyncSandbox, AsyncTemplate, Sandbox, Template, aexplore, explore


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'branchbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
