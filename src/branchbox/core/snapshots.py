"""Pure helpers of snapshots, restores and forks: ids, names, limits, a child's fresh identity files."""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from branchbox.backends.base import IdMap
from branchbox.errors import BadRequestError, LimitExceededError

FLATTEN_DEPTH = 16  # snapshot chains deeper than this are flattened in the background
MAX_CHAIN = 64  # a restore onto a deeper chain flattens it first (overlay mount options fit in one page)
MAX_FORK = 64  # children per fork call
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(8)


def new_layer_id() -> str:
    return "layer-" + secrets.token_hex(8)


def snapshot_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequestError(
            f"snapshot name {name!r} is invalid: 1-128 letters, digits and _ . : -, starting with a letter or digit"
        )
    if name.startswith("snap-"):
        raise BadRequestError(f"snapshot name {name!r} is invalid: names starting with 'snap-' look like ids")
    return name


def fork_count(count: int, free: int) -> int:
    """Validate a fork's child count against the per-call limit and the sandboxes still allowed (``free``)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise BadRequestError(f"fork count must be an integer >= 1, got {count!r}")
    if count > MAX_FORK:
        raise LimitExceededError(f"fork count {count} is above the limit of {MAX_FORK} children per call")
    if count > free:
        raise LimitExceededError(
            f"fork of {count} children would exceed max_sandboxes ({free} more allowed): destroy some sandboxes"
        )
    return count


def write_machine_id(upper: Path, lowers: Sequence[Path], idmap: IdMap) -> str:
    """Give a sandbox a fresh ``/etc/machine-id`` by writing it into its upper layer before boot."""
    etc = upper / "etc"
    if not etc.is_dir() or etc.is_symlink():
        ref = next((p / "etc" for p in lowers if (p / "etc").is_dir() and not (p / "etc").is_symlink()), None)
        st = os.stat(ref) if ref is not None else None
        etc.mkdir(mode=0o755)
        os.chown(etc, st.st_uid if st else idmap.host_base, st.st_gid if st else idmap.host_base)
        os.chmod(etc, stat.S_IMODE(st.st_mode) if st else 0o755)
        if st is not None:
            os.utime(etc, ns=(st.st_atime_ns, st.st_mtime_ns))
    value = secrets.token_hex(16)
    path = etc / "machine-id"
    if path.is_symlink() or path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
    try:
        os.write(fd, (value + "\n").encode())
        os.fchown(fd, idmap.host_base, idmap.host_base)
        os.fchmod(fd, 0o444)
    finally:
        os.close(fd)
    return value
