"""An image's rootfs from its layers, through a cache of unpacked layer stacks shared by every template.

``layers/<chain id hex>/`` is the root filesystem of the image's first N layers (OCI's ChainID names the stack,
not the single layer: a layer's meaning depends on what is under it). A stack is built from the one below it by
a copy-on-write clone plus that layer's changes, in the import's temp dir, and renamed into place when complete
(so a half-made stack is never seen, and a crashed import leaves only a temp dir the store cleans). A template's
rootfs is one more clone of the top stack. On btrfs each stack is a subvolume and a clone is a snapshot (O(1));
elsewhere ``cp -a --reflink=auto`` (XFS: reflinks; ext4: a full copy). Two images sharing base layers share the
stacks of those layers; a second import of one image unpacks nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from branchbox.backends.base import IdMap
from branchbox.errors import TemplateBuildError
from branchbox.images.oci_layout import Image, chain_id, verify_blob
from branchbox.images.oci_unpack import Budget, apply_layer
from branchbox.images.shift import shift_id
from branchbox.storage.btrfs import create_subvolume, is_subvolume, snapshot

#: bump when the unpacked trees change for the same image (part of every stack key and template digest)
OCI_IMPORTER_VERSION = 1

Say = Callable[[str, str, "float | None"], None]


def template_digest(image: Image, idmap: IdMap) -> str:
    """The template digest of an image: its manifest digest, the importer version and the id range."""
    blob = json.dumps(
        {
            "oci_manifest": image.manifest_digest,
            "importer": OCI_IMPORTER_VERSION,
            "idmap": [idmap.host_base, idmap.count],
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()


def _stack_key(chain: str, idmap: IdMap) -> str:
    return hashlib.sha256(f"{chain} {OCI_IMPORTER_VERSION} {idmap.host_base} {idmap.count}".encode()).hexdigest()


def _new_tree(path: Path, idmap: IdMap) -> None:
    try:
        create_subvolume(path)
    except OSError:
        path.mkdir()
    os.chmod(path, 0o755)  # noqa: S103 - an image's / is world-readable, as in every rootfs
    os.lchown(path, shift_id(0, idmap), shift_id(0, idmap))


def clone_tree(src: Path, dest: Path) -> None:
    """``dest`` = a copy-on-write copy of ``src`` (btrfs snapshot when ``src`` is a subvolume)."""
    if is_subvolume(src):
        try:
            snapshot(src, dest, readonly=False)
            return
        except OSError:
            pass
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", str(src), str(dest)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise TemplateBuildError(f"copying {src} failed: {proc.stderr.strip()[-400:]}", step="clone")


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def unpack_image(
    image: Image,
    *,
    blobs: Path,
    stacks: Path,
    locks: Path,
    work: Path,
    dest: Path,
    idmap: IdMap,
    budget: Budget,
    say: Say,
) -> dict[str, int]:
    """Make ``dest`` (absent; inside ``work``'s filesystem) the image's rootfs; returns layer cache counters."""
    stacks.mkdir(mode=0o700, exist_ok=True)
    parent: str | None = None
    top: Path | None = None
    counts = {"layers_cached": 0, "layers_unpacked": 0, "skipped_devices": 0}
    n = len(image.layers)
    for i, layer in enumerate(image.layers):
        parent = chain_id(parent, layer.diff_id)
        key = _stack_key(parent, idmap)
        final = stacks / key
        label = f"layer {i + 1}/{n} {layer.digest[7:19]}"
        if not final.is_dir():
            with _flock(locks / f"stack-{key}.lock"):
                if not final.is_dir():  # not made by a concurrent import meanwhile
                    t0 = time.monotonic()
                    say("verify", f"{label}: checking {layer.size / 1e6:.1f} MB", i / n)
                    blob = verify_blob(blobs, layer)
                    tree = work / f"stack-{i}"
                    if top is None:
                        _new_tree(tree, idmap)
                    else:
                        clone_tree(top, tree)
                    say("unpack", f"{label}: unpacking", i / n)
                    counts["skipped_devices"] += apply_layer(tree, blob, layer, idmap, budget)
                    os.rename(tree, final)
                    counts["layers_unpacked"] += 1
                    say("unpack", f"{label}: unpacked in {time.monotonic() - t0:.1f} s", (i + 1) / n)
                    top = final
                    continue
        counts["layers_cached"] += 1
        say("cached", f"{label}: cached", (i + 1) / n)
        top = final
    assert top is not None
    clone_tree(top, dest)
    return counts
