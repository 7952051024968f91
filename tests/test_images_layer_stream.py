"""The layer stream of image imports (images/layer_stream.py): gzip inflated by ISA-L and hashed on a thread of
its own, zstd through its tool; what it accepts (concatenated members, zero padding) and refuses (truncation,
trailing garbage, corrupt data, more than the cap), and that leaving it early stops its thread and process."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from branchbox.backends.base import IdMap
from branchbox.errors import ImageDigestMismatchError, ImageTooLargeError, UnsupportedImageError
from branchbox.images.layer_stream import CHUNK, LayerStream
from branchbox.images.oci_layout import Layer
from branchbox.images.oci_unpack import Budget, apply_layer
from tests.oci_images import Entry, digest_of, tar_bytes

PAYLOAD = os.urandom(3 * CHUNK + 12345) + bytes(2 * CHUNK)  # incompressible part, then a compressible one


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _read_all(path: Path, compression: str, cap: int = 1 << 40, n: int = 10240) -> tuple[bytes, str]:
    out = bytearray()
    with LayerStream(path, compression, cap) as s:
        while data := s.read(n):
            out += data
        s.drain()
        return bytes(out), s.sha256()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("n", [4099, 512, 10240, CHUNK, 3 * CHUNK, -1])
def test_gzip_round_trips_whatever_the_read_size(tmp_path: Path, n: int) -> None:
    p = _write(tmp_path, "l.gz", gzip.compress(PAYLOAD, compresslevel=1))
    data, sha = _read_all(p, "gzip", n=n)
    assert data == PAYLOAD
    assert sha == _sha(PAYLOAD)


def test_gzip_members_and_zero_padding_are_accepted(tmp_path: Path) -> None:
    a, b = PAYLOAD[:5000], PAYLOAD[5000:]
    two = gzip.compress(a) + gzip.compress(b)
    assert _read_all(_write(tmp_path, "two.gz", two), "gzip")[0] == PAYLOAD
    padded = two + bytes(CHUNK + 7)  # zeros past a read boundary, as some tools pad to a block size
    assert _read_all(_write(tmp_path, "pad.gz", padded), "gzip")[0] == PAYLOAD
    # gzip(1) agrees with both
    for name in ("two.gz", "pad.gz"):
        proc = subprocess.run(["gzip", "-dc", str(tmp_path / name)], capture_output=True, check=False)
        assert proc.returncode in (0, 2) and proc.stdout == PAYLOAD


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda z: z[: len(z) // 2], "truncated"),
        (lambda z: z[:-4], "truncated|not valid gzip"),  # the length trailer cut off
        (lambda z: z + b"\x00\x00garbage", "data after the last member"),
        (lambda z: z + b"PK\x03\x04", "data after the last member"),
        (lambda z: b"\x00" + z, "no gzip header"),
        (lambda z: z[:20] + bytes(x ^ 0x5A for x in z[20:60]) + z[60:], "not valid gzip"),
        (lambda z: z[:-8] + bytes(4) + z[-4:], "not valid gzip"),  # a wrong crc32
    ],
)
def test_bad_gzip_is_refused(tmp_path: Path, mangle: Callable[[bytes], bytes], match: str) -> None:
    z = gzip.compress(PAYLOAD[: 2 * CHUNK])
    p = _write(tmp_path, "bad.gz", mangle(z))
    with pytest.raises(UnsupportedImageError, match=match):
        _read_all(p, "gzip")


def test_a_gzip_bomb_stops_at_the_cap_with_bounded_memory(tmp_path: Path) -> None:
    bomb = gzip.compress(bytes(256 * CHUNK), compresslevel=9)  # 256 MiB of zeros in ~250 KiB
    assert len(bomb) < 1 << 20
    p = _write(tmp_path, "bomb.gz", bomb)
    biggest = 0

    def consume() -> None:
        nonlocal biggest
        with LayerStream(p, "gzip", 8 * CHUNK) as s:
            while data := s.read(-1):
                biggest = max(biggest, len(data))

    with pytest.raises(ImageTooLargeError, match="unpack cap"):
        consume()
    assert 0 < biggest <= CHUNK  # one chunk at a time, never the whole bomb


def test_zstd_and_plain(tmp_path: Path) -> None:
    z = subprocess.run(["zstd", "-q", "-c"], input=PAYLOAD, capture_output=True, check=True).stdout
    assert _read_all(_write(tmp_path, "l.zst", z), "zstd") == (PAYLOAD, _sha(PAYLOAD))
    assert _read_all(_write(tmp_path, "l.tar", PAYLOAD), "") == (PAYLOAD, _sha(PAYLOAD))
    with pytest.raises(UnsupportedImageError, match="zstd"):
        _read_all(_write(tmp_path, "bad.zst", z[: len(z) // 2]), "zstd")
    with pytest.raises(UnsupportedImageError, match="compression"):
        LayerStream(tmp_path / "l.tar", "bzip2", 1)


def test_leaving_early_stops_the_thread_and_the_process(tmp_path: Path) -> None:
    big = os.urandom(CHUNK) * 40
    z = subprocess.run(["zstd", "-q", "-1", "-c"], input=big, capture_output=True, check=True).stdout
    for path, compression in (
        (_write(tmp_path, "b.gz", gzip.compress(big, 1)), "gzip"),
        (_write(tmp_path, "b.zst", z), "zstd"),
    ):
        before = {t.ident for t in threading.enumerate()}
        with LayerStream(path, compression, 1 << 40) as s:
            assert s.read(100)
            time.sleep(0.2)  # the producer fills the queue and blocks
            proc = s._proc
        assert not [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("layer-")]
        if compression == "zstd":
            assert proc is not None and proc.poll() is not None


def test_apply_layer_checks_the_diff_id_of_the_whole_stream(tmp_path: Path) -> None:
    """Bytes after the tar's end-of-archive blocks are hashed too: a layer cannot smuggle data past the check."""
    raw = tar_bytes([Entry("etc/x", data=b"x")])
    blob = _write(tmp_path, "l.gz", gzip.compress(raw + b"hidden" + bytes(1024)))
    root = tmp_path / "root"
    root.mkdir()
    honest = Layer("sha256:" + "0" * 64, 0, "", "gzip", digest_of(raw))
    with pytest.raises(ImageDigestMismatchError):
        apply_layer(root, blob, honest, IdMap(), Budget())
    whole = Layer("sha256:" + "0" * 64, 0, "", "gzip", digest_of(raw + b"hidden" + bytes(1024)))
    (root / "etc/x").unlink()
    apply_layer(root, blob, whole, IdMap(), Budget())
    assert (root / "etc/x").read_bytes() == b"x"
