"""Installs the in-sandbox agent's code under the data dir, versioned by content hash.

The directory ``DATA/agent/<hash>/`` holds package ``bbagent`` (copies of ``branchbox/agent/{__init__,wire,server}.py``)
plus bytecode compiled by this interpreter; backends bind it read-only at ``/.branchbox`` inside sandboxes.
Bytecode is only used by a sandbox python of the same minor version (3.11 for the Debian 12 templates); other
versions compile the agent in memory at start.
"""

from __future__ import annotations

import compileall
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import branchbox.agent

AGENT_FILES = ("__init__.py", "wire.py", "server.py")


def agent_source_dir() -> Path:
    return Path(branchbox.agent.__file__).parent


def install_agent(data_dir: Path) -> Path:
    """Return the directory to bind at /.branchbox, creating it when this agent version is new. Idempotent."""
    src = agent_source_dir()
    h = hashlib.sha256()
    for name in AGENT_FILES:
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    target = data_dir / "agent" / h.hexdigest()[:16]
    if (target / "bbagent" / "server.py").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        pkg = tmp / "bbagent"
        pkg.mkdir()
        for name in AGENT_FILES:
            shutil.copyfile(src / name, pkg / name)
        compileall.compile_dir(pkg, quiet=1)
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        try:
            tmp.rename(target)
        except OSError:  # another process installed the same version first
            if not (target / "bbagent" / "server.py").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
