"""Pure helpers of snapshots, restores and forks: ids, names, limits, a child's fresh identity files."""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from branchbox.backends.base import IdMap, LayerInfo
from branchbox.errors import BadRequestError, LimitExceededError
from branchbox.images.shift import rebase_id, rebase_tree
from branchbox.storage.base import StorageDriver

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


def write_machine_id(upper: Path, lowers: Sequence[Path], idmap: IdMap, bases: Sequence[int] = ()) -> str:
    """Give a sandbox a fresh ``/etc/machine-id`` by writing it into its upper layer (owned in ``idmap``'s range)
    before boot. ``bases``: the range each lower is owned in (empty: ``idmap``'s)."""
    etc = upper / "etc"
    if not etc.is_dir() or etc.is_symlink():
        found = ((p / "etc", b) for p, b in zip(lowers, bases or [idmap.host_base] * len(lowers), strict=True))
        ref, ref_base = next(((e, b) for e, b in found if e.is_dir() and not e.is_symlink()), (None, idmap.host_base))
        st = os.stat(ref) if ref is not None else None
        etc.mkdir(mode=0o755)
        uid = rebase_id(st.st_uid, ref_base, idmap) if st else idmap.host_base
        os.chown(etc, uid, rebase_id(st.st_gid, ref_base, idmap) if st else idmap.host_base)
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


def flatten_canonical(
    driver: StorageDriver, layers: Sequence[Path], dest: Path, bases: Sequence[int], canonical: IdMap
) -> LayerInfo:
    """Flatten ``layers`` (owned in the ranges ``bases``) into ``dest``, its owners rewritten to the canonical range:
    one flat layer has one range, and the canonical one is read by every sandbox through its idmapped mount."""
    layer = driver.flatten(layers, dest)
    if any(b != canonical.host_base for b in bases):
        rebase_tree(dest, set(bases), canonical)
    return layer
