"""Read an image out of an OCI layout: index -> (platform) -> manifest -> config and layers, every blob verified.

Blobs are addressed ``sha256:<64 hex>`` only (anything else is refused before it becomes a path), JSON blobs are
read whole up to 4 MiB and checked against their descriptor's size and digest; layers are checked when they are
unpacked (``verify_blob`` for the compressed bytes, the diff id while extracting). From an index (OCI or Docker
manifest list) the host's platform is chosen (linux/amd64 here); a single manifest must be for it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchbox.errors import ImageDigestMismatchError, ImageNotFoundError, UnsafeImageError, UnsupportedImageError

INDEX_TYPES = frozenset(
    {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
)
MANIFEST_TYPES = frozenset(
    {"application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"}
)
CONFIG_TYPES = frozenset({"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"})
#: layer media type -> compression ("" = plain tar)
LAYER_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_JSON = 4 << 20
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def host_platform() -> tuple[str, str]:
    """(os, architecture) in OCI's words for this host, e.g. ('linux', 'amd64')."""
    machine = platform.machine()
    return "linux", _ARCH.get(machine, machine)


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str  # of the blob as stored (compressed)
    size: int
    media_type: str
    compression: str  # "", "gzip" or "zstd"
    diff_id: str  # sha256 of the uncompressed tar (from the config)


@dataclass(frozen=True, slots=True)
class Image:
    manifest_digest: str
    config_digest: str
    layers: tuple[Layer, ...]
    os: str
    architecture: str
    config: dict[str, Any] = field(default_factory=dict)  # the config's "config" object (Env, Cmd, ...)


def blob_path(blobs: Path, digest: object) -> Path:
    """The file of ``digest`` in ``blobs`` (``blobs/sha256/<hex>``); refuses anything but a sha256 digest."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        if isinstance(digest, str) and ":" in digest and not digest.startswith("sha256:"):
            raise UnsupportedImageError(f"blob digest algorithm of {digest[:80]!r} is not supported (sha256 only)")
        raise UnsafeImageError(f"bad blob digest {str(digest)[:80]!r} in the image (expected sha256:<64 hex>)")
    return blobs / "sha256" / digest[7:]


def _mismatch(digest: str, what: str) -> ImageDigestMismatchError:
    return ImageDigestMismatchError(
        f"blob {digest} ({what}) does not match its digest: the image is corrupt or was tampered with; "
        "nothing was imported",
        digest=digest,
    )


def _descriptor(obj: object, what: str) -> tuple[str, int, str]:
    if not isinstance(obj, dict):
        raise UnsupportedImageError(f"{what}: a descriptor must be an object")
    digest, size, media = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(media, str):
        raise UnsupportedImageError(f"{what}: descriptor without a valid size/mediaType")
    blob_path(Path("/"), digest)  # validates the digest's form
    assert isinstance(digest, str)
    return digest, size, media


def read_json_blob(blobs: Path, digest: str, size: int, what: str) -> dict[str, Any]:
    """A JSON blob, checked against its size and digest."""
    if size > _MAX_JSON:
        raise UnsupportedImageError(f"{what} {digest} is {size} bytes (over {_MAX_JSON} bytes)")
    path = blob_path(blobs, digest)
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_JSON + 1)
    except FileNotFoundError:
        raise ImageNotFoundError(f"{what} {digest} is missing from the image") from None
    if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise _mismatch(digest, what)
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise UnsupportedImageError(f"{what} {digest} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise UnsupportedImageError(f"{what} {digest} is not a JSON object")
    return doc


def verify_blob(blobs: Path, layer: Layer) -> Path:
    """The layer's blob file after checking its size and sha256 (streamed)."""
    path = blob_path(blobs, layer.digest)
    h = hashlib.sha256()
    n = 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                n += len(chunk)
                if n > layer.size:
                    break
                h.update(chunk)
    except FileNotFoundError:
        raise ImageNotFoundError(f"layer {layer.digest} is missing from the image") from None
    if n != layer.size or "sha256:" + h.hexdigest() != layer.digest:
        path.unlink(missing_ok=True)  # a shared blob gone bad: the next import downloads it again
        raise _mismatch(layer.digest, "layer")
    return path


def _pick_platform(blobs: Path, index: dict[str, Any], digest: str, want: tuple[str, str]) -> tuple[str, int]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise UnsupportedImageError(f"index {digest} has no manifests list")
    seen = []
    for i, m in enumerate(manifests):
        d, size, media = _descriptor(m, f"index {digest} manifests[{i}]")
        plat = m.get("platform") or {}
        pos, parch = plat.get("os", ""), plat.get("architecture", "")
        seen.append(f"{pos}/{parch}")
        if (pos, parch) == want and media in MANIFEST_TYPES:
            return d, size
    raise UnsupportedImageError(
        f"the image has no {want[0]}/{want[1]} variant (it has {', '.join(seen) or 'none'})", platforms=seen
    )


def read_image(layout: Path, blobs: Path, *, ref_name: str | None = None, want: tuple[str, str] | None = None) -> Image:
    """The image named ``ref_name`` (or the only one) in the layout at ``layout`` whose blobs are in ``blobs``."""
    want = want or host_platform()
    try:
        raw = (layout / "index.json").read_bytes()[:_MAX_JSON]
        index = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ImageNotFoundError(f"no readable OCI index at {layout}: {exc}") from exc
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ImageNotFoundError(f"the OCI layout at {layout} holds no image")
    if ref_name is not None:
        named = [
            e
            for e in entries
            if isinstance(e, dict) and (e.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref_name
        ]
        if not named:
            raise ImageNotFoundError(f"no image named {ref_name!r} in the OCI layout at {layout}")
        entries = named
    elif len(entries) > 1:
        raise ImageNotFoundError(f"the OCI layout at {layout} holds {len(entries)} images: name one (oci:DIR:NAME)")
    digest, size, media = _descriptor(entries[0], "index.json")
    for _ in range(4):  # an index may point at an index
        if media not in INDEX_TYPES:
            break
        digest, size = _pick_platform(blobs, read_json_blob(blobs, digest, size, "index"), digest, want)
        media = "application/vnd.oci.image.manifest.v1+json"
    manifest = read_json_blob(blobs, digest, size, "manifest")
    mtype = manifest.get("mediaType", media)
    if mtype in INDEX_TYPES:
        digest, size = _pick_platform(blobs, manifest, digest, want)
        manifest = read_json_blob(blobs, digest, size, "manifest")
        mtype = manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
    if mtype not in MANIFEST_TYPES or manifest.get("schemaVersion") != 2:
        raise UnsupportedImageError(f"manifest {digest} has media type {str(mtype)[:100]!r}: not an image manifest")
    cdigest, csize, ctype = _descriptor(manifest.get("config"), f"manifest {digest} config")
    if ctype not in CONFIG_TYPES:
        raise UnsupportedImageError(f"config media type {ctype[:100]!r} is not an image config (an artifact?)")
    config = read_json_blob(blobs, cdigest, csize, "config")
    if (config.get("os"), config.get("architecture")) != want:
        raise UnsupportedImageError(
            f"the image is for {config.get('os')}/{config.get('architecture')}, this host runs {want[0]}/{want[1]}"
        )
    rootfs = config.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    descs = manifest.get("layers")
    if not isinstance(descs, list) or not isinstance(diff_ids, list) or len(descs) != len(diff_ids):
        raise UnsupportedImageError(f"manifest {digest}: layers and the config's diff_ids do not pair up")
    if not descs:
        raise UnsupportedImageError(f"image {digest} has no layers")
    layers = []
    for i, (desc, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        ld, lsize, ltype = _descriptor(desc, f"manifest {digest} layers[{i}]")
        if ltype not in LAYER_TYPES:
            raise UnsupportedImageError(
                f"layer {i} ({ld}) has media type {ltype[:100]!r}: supported are plain, gzip and zstd tar layers",
                media_type=ltype[:100],
            )
        blob_path(Path("/"), diff_id)
        layers.append(Layer(ld, lsize, ltype, LAYER_TYPES[ltype], diff_id))
    cfg = config.get("config") or {}
    return Image(
        manifest_digest=digest,
        config_digest=cdigest,
        layers=tuple(layers),
        os=want[0],
        architecture=want[1],
        config=cfg if isinstance(cfg, dict) else {},
    )


def chain_id(parent: str | None, diff_id: str) -> str:
    """OCI's ChainID: the identity of a layer stacked on its parents (the key of the unpacked-layer cache)."""
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Env (dict), WorkingDir, User, Entrypoint and Cmd of an image config's ``config`` object, checked."""
    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        if isinstance(item, str) and "=" in item and not item.startswith("="):
            k, _, v = item.partition("=")
            env[k] = v
    workdir = "/" + os.path.normpath("/" + str(config.get("WorkingDir") or "/")).lstrip("/")
    user = (
        str(config.get("User") or "root").partition(":")[0] or "root"
    )  # USER name[:group]: the agent takes a name or uid

    def argv(v: object) -> list[str] | None:
        return [str(x) for x in v] if isinstance(v, list) else None

    return {
        "env": env,
        "workdir": workdir,
        "user": user,
        "entrypoint": argv(config.get("Entrypoint")),
        "cmd": argv(config.get("Cmd")),
    }
