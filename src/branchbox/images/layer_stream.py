"""A layer's uncompressed tar stream, decompressed and hashed on a thread of its own.

The unpacker (one Python thread, per-entry work) must not also pay for inflating and hashing: gzip is inflated
with ISA-L (``isal``: ~3x zlib's speed, ~4x gzip(1)'s here), sha256 by hashlib; both release the GIL, so they run
on the second core while the unpacker writes files. zstd stays in a ``zstd -dc`` process (its C decoder is fast;
the thread only hashes what it reads). The stream is handed over in chunks of at most :data:`CHUNK` bytes through
a short queue (bounded memory whatever the compression ratio: a gzip bomb inflates one chunk at a time).

What the stream guarantees: every byte the consumer reads was hashed; more than ``cap`` uncompressed bytes is
``image_too_large``; a truncated or corrupt compressed stream is ``unsupported_image`` naming the compression;
gzip members may be concatenated (as gzip(1) and Go's reader accept) and zero padding after the last member is
ignored, other trailing bytes are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from isal import isal_zlib

from branchbox.errors import BranchboxError, ImageTooLargeError, UnsupportedImageError

CHUNK = 1 << 20
_DEPTH = 8  # chunks in flight between the threads (8 MiB at most)
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 31
IsalError: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # a class (its stub says an instance)


class _Stop(Exception):
    """The consumer went away: the producer ends quietly."""


class LayerStream:
    """File-like ``read(n)`` over a layer's uncompressed bytes; ``sha256()`` once drained. Use as a context
    manager: leaving it stops the producer thread and any decompressor process."""

    def __init__(self, path: Path, compression: str, cap: int) -> None:
        if compression not in ("", "gzip", "zstd"):
            raise UnsupportedImageError(f"layer {path.name}: unknown compression {compression!r}")
        self.path = path
        self.compression = compression
        self.cap = cap
        self.count = 0
        self._sha = hashlib.sha256()
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(_DEPTH)
        self._stop = threading.Event()
        self._buf = b""
        self._pos = 0
        self._done = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._produce, name=f"layer-{path.name[:12]}", daemon=True)

    # ---- consumer side ----

    def __enter__(self) -> LayerStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
                self._q.get(timeout=0.05)
        if proc is not None:
            proc.wait()

    def _next(self) -> bool:
        if self._done:
            return False
        item = self._q.get()
        if item is None:
            self._done = True
            return False
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._buf, self._pos = item, 0
        return True

    def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._buf) and not self._next():
            return b""
        if n < 0 or (self._pos == 0 and n >= len(self._buf)):
            out = self._buf[self._pos :] if self._pos else self._buf
            self._buf, self._pos = b"", 0
            return out
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def drain(self) -> None:
        """Read to the end (what follows the tar's end-of-archive blocks is part of the diff id too)."""
        self._buf, self._pos = b"", 0
        while self._next():
            self._buf, self._pos = b"", 0

    def sha256(self) -> str:
        assert self._done, "sha256() before the stream was drained"
        return "sha256:" + self._sha.hexdigest()

    # ---- producer side (its own thread) ----

    def _put(self, item: bytes | BaseException | None) -> None:
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.count += len(data)
        if self.count > self.cap:
            raise ImageTooLargeError(
                "a layer's uncompressed stream is larger than the image's unpack cap: refusing it (--max-size)",
                limit="max_bytes",
            )
        self._sha.update(data)
        self._put(data)

    def _produce(self) -> None:
        try:
            for data in self._chunks():
                self._emit(data)
            self._put(None)
        except _Stop:
            return
        except BranchboxError as exc:
            self._finish_with(exc)
        except (OSError, IsalError) as exc:
            self._finish_with(
                UnsupportedImageError(f"layer {self.path.name} is not valid {self.compression or 'tar'}: {exc}")
            )

    def _finish_with(self, exc: BaseException) -> None:
        with contextlib.suppress(_Stop):
            self._put(exc)

    def _chunks(self) -> Iterator[bytes]:
        if self.compression == "gzip":
            yield from self._gunzip()
        elif self.compression == "zstd":
            yield from self._unzstd()
        else:
            with self.path.open("rb") as fh:
                while data := fh.read(CHUNK):
                    yield data

    def _gunzip(self) -> Iterator[bytes]:
        with self.path.open("rb") as fh:
            pending = fh.read(CHUNK)
            if not pending.startswith(_GZIP_MAGIC):
                raise UnsupportedImageError(f"layer {self.path.name} is not valid gzip: no gzip header")
            d = isal_zlib.decompressobj(_GZIP_WBITS)
            while True:
                if not pending:
                    pending = fh.read(CHUNK)
                    if not pending:
                        yield d.flush()
                        if not d.eof:
                            raise UnsupportedImageError(f"layer {self.path.name} is not valid gzip: truncated")
                        return
                # at most CHUNK bytes out per call: a bomb never sits in memory whole
                yield d.decompress(pending, CHUNK)
                pending = d.unconsumed_tail
                if d.eof:  # a member ended: another member, zero padding (gzip(1) ignores it), or garbage
                    rest = d.unused_data
                    while len(rest) < len(_GZIP_MAGIC) and (more := fh.read(CHUNK)):
                        rest += more
                    if not rest.strip(b"\0") and _only_zeros(fh):
                        return
                    if not rest.startswith(_GZIP_MAGIC):
                        raise UnsupportedImageError(
                            f"layer {self.path.name} is not valid gzip: data after the last member"
                        )
                    d, pending = isal_zlib.decompressobj(_GZIP_WBITS), rest

    def _unzstd(self) -> Iterator[bytes]:
        argv = ["zstd", "-dcq", "--", str(self.path)]
        self._proc = proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            while data := proc.stdout.read(CHUNK):
                yield data
            err = proc.stderr.read(4096).decode(errors="replace").strip()
            if proc.wait() != 0:
                raise UnsupportedImageError(f"layer {self.path.name} is not valid zstd: {err[-300:]}")
        finally:
            proc.stdout.close()
            proc.stderr.close()


def _only_zeros(fh: IO[bytes]) -> bool:
    """True when the rest of ``fh`` is zero bytes (consumes it)."""
    while data := fh.read(CHUNK):
        if data.strip(b"\0"):
            return False
    return True
