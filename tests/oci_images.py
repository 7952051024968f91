"""Container images the tests (and bench/images_bench.py) make themselves: OCI layouts written byte by byte, turned
into other transports with skopeo, and a local registry (Debian's ``docker-registry``) on loopback.

Layers are deterministic (mtime 0, sorted), so the same test image has the same digests in every run and the
store's layer cache is reused instead of growing.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA = {
    "": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass
class Entry:
    """One tar member: kind is file, dir, symlink, hardlink, fifo or chardev."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def tar_bytes(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.mtime = 0
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.pax_headers = dict(e.pax)
            data = None
            if e.kind == "file":
                ti.size = len(e.data)
                data = io.BytesIO(e.data)
            elif e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.link
            elif e.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.link
            elif e.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            elif e.kind == "chardev":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(ti, data)
    return buf.getvalue()


def dir_tar(root: Path, id_offset: int = 0) -> bytes:
    """A deterministic tar of a directory tree (numeric owners as on disk minus ``id_offset``, mtime 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                p = Path(dirpath) / name
                ti = tar.gettarinfo(str(p), arcname=str(p.relative_to(root)))
                ti.mtime = 0
                ti.uname = ti.gname = ""
                ti.uid, ti.gid = max(0, ti.uid - id_offset), max(0, ti.gid - id_offset)
                if ti.ischr() or ti.isblk():
                    continue
                if ti.isreg():
                    with p.open("rb") as fh:
                        tar.addfile(ti, fh)
                else:
                    tar.addfile(ti)
    return buf.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=1, mtime=0)
    if compression == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    return raw


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(layout: Path, data: bytes) -> str:
    d = digest_of(data)
    path = layout / "blobs" / "sha256" / d[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return d


def write_layout(
    layout: Path,
    layers: list[bytes],
    *,
    compression: str = "gzip",
    config: dict[str, Any] | None = None,
    tag: str = "latest",
    architecture: str = "amd64",
    as_index: bool = False,
    layer_media: str | None = None,
    diff_ids: list[str] | None = None,
) -> str:
    """Write an OCI layout with these (uncompressed) layer tars; returns the image manifest's digest.

    ``as_index`` puts the manifest behind an image index (with an arm64 decoy entry first)."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descs = []
    for raw in layers:
        data = compress(raw, compression)
        descs.append(
            {"mediaType": layer_media or LAYER_MEDIA[compression], "digest": _blob(layout, data), "size": len(data)}
        )
    cfg = {
        "architecture": architecture,
        "os": "linux",
        "config": config or {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or [digest_of(raw) for raw in layers]},
    }
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _blob(layout, cfg_bytes), "size": len(cfg_bytes)},
        "layers": descs,
    }
    m_bytes = json.dumps(manifest, sort_keys=True).encode()
    m_digest = _blob(layout, m_bytes)
    top = {"mediaType": OCI_MANIFEST, "digest": m_digest, "size": len(m_bytes)}
    if as_index:
        decoy = {**top, "platform": {"os": "linux", "architecture": "arm64"}}
        idx = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [decoy, {**top, "platform": {"os": "linux", "architecture": architecture}}],
        }
        i_bytes = json.dumps(idx, sort_keys=True).encode()
        top = {"mediaType": OCI_INDEX, "digest": _blob(layout, i_bytes), "size": len(i_bytes)}
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return m_digest


def skopeo_copy(src: str, dest: str, *extra: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", *extra, src, dest], check=True, capture_output=True, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    """A docker-registry on 127.0.0.1 (plain HTTP), optionally with htpasswd auth."""

    host: str
    creds: str | None
    proc: subprocess.Popen[bytes]
    root: Path

    def ref(self, repo: str) -> str:
        return f"docker://{self.host}/{repo}"

    def push(self, src: str, repo: str) -> None:
        extra = ["--dest-tls-verify=false"]
        extra += ["--dest-creds", self.creds] if self.creds else ["--dest-no-creds"]
        skopeo_copy(src, self.ref(repo), *extra)


@contextlib.contextmanager
def registry(root: Path, *, creds: str | None = None) -> Iterator[Registry]:
    """Start ``docker-registry`` with storage in ``root``; stops it and removes ``root`` afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = ""
    if creds:
        user, _, password = creds.partition(":")
        htpasswd = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True).stdout
        (root / "htpasswd").write_bytes(htpasswd)
        auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
    (root / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {(root / 'registry.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", creds, proc, root)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def dockerd() -> Iterator[str]:
    """A Docker daemon of the test's own (sockets, data and exec roots in a temp dir), started without touching
    the host's network: no iptables rules, no ip_forward, no docker0 bridge. Yields its ``unix://`` host; stopped
    and removed afterwards (mounts under its root included)."""
    root = Path(tempfile.mkdtemp(prefix="bb-dockerd-", dir="/var/tmp"))
    host = f"unix://{root}/docker.sock"
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            "dockerd", "-H", host, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
            "--pidfile", str(root / "dockerd.pid"), "--iptables=false", "--ip6tables=false", "--ip-forward=false",
            "--ip-masq=false", "--bridge=none", "--userland-proxy=false", "--log-level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "-H", host, "info"], capture_output=True, check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start: {(root / 'dockerd.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield host
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        with open("/proc/self/mounts") as fh:
            mounts = [line.split()[1] for line in fh if line.split()[1].startswith(str(root))]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
