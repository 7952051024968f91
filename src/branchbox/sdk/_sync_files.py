# Generated from _async_files.py by scripts/gen_sync.py (unasync): edit _async_files.py, then run `make sdk`.
"""Files in a sandbox: ``sbx.files`` (read, write, list, stat, mkdir, remove, rename; streamed uploads,
downloads and tar archives of directories).

Written once, for both flavours: ``scripts/gen_sync.py`` generates its sync twin (``_sync*.py``, unasync);
never edit the twin by hand.

``timeout=`` parameters are the command's or the sandbox's lifetime (E2B naming), not a deadline of the call
itself, hence the ASYNC109 exemptions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, overload

import branchbox.sdk._requests as rq
import branchbox.sdk._tar as _tar
from branchbox.sdk._concurrency import offload
from branchbox.sdk._config import UNSET
from branchbox.sdk._errors import FileNotFoundError_
from branchbox.sdk._models import MAX_READ_BYTES, ArchiveInfo, EntryInfo, FilesystemEvent
from branchbox.sdk._sync_http import Timeout, _Owner

if TYPE_CHECKING:  # websockets itself is imported on first use, by ws()
    from websockets.sync.client import ClientConnection

CHUNK = 256 * 1024


class Files:
    """``sbx.files``: read, write, list, stat, mkdir, remove, rename; streamed upload and download."""

    def __init__(self, sandbox: _Owner) -> None:
        self._sandbox = sandbox

    @property
    def _sid(self) -> str:
        return self._sandbox.sandbox_id

    @overload
    def read(
        self,
        path: str,
        *,
        format: Literal["text"] = ...,
        max_size: int | None = ...,
        request_timeout: Timeout = ...,
    ) -> str: ...
    @overload
    def read(
        self, path: str, *, format: Literal["bytes"], max_size: int | None = ..., request_timeout: Timeout = ...
    ) -> bytes: ...
    def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes"] = "text",
        max_size: int | None = MAX_READ_BYTES,
        request_timeout: Timeout = UNSET,
    ) -> str | bytes:
        """The whole file. One larger than ``max_size`` bytes (64 MiB; None: no limit) raises BadRequestError
        (``payload_too_large``) before anything is sent: stream it with :meth:`download` instead."""
        req = rq.read_file(self._sid, path, max_size)
        resp = self._sandbox._http.send(req, request_timeout=request_timeout)
        return resp.content.decode("utf-8") if format == "text" else resp.content

    def download(self, path: str, target: str | Path | IO[bytes], *, request_timeout: Timeout = UNSET) -> int:
        """Stream a sandbox file into a local path or binary file object; returns the byte count."""
        return self._save(rq.read_file(self._sid, path), target, request_timeout)

    def download_archive(self, path: str, target: str | Path | IO[bytes], *, request_timeout: Timeout = UNSET) -> int:
        """Stream a tar of a sandbox path into a local path or binary file object; returns the byte count. A
        directory's members are named relative to it; a file is one member under its own name."""
        return self._save(rq.read_archive(self._sid, path), target, request_timeout)

    def _save(self, req: rq.Req, target: str | Path | IO[bytes], request_timeout: Timeout) -> int:
        n = 0
        with self._sandbox._http.stream(req, request_timeout=request_timeout) as resp:
            f = open(target, "wb") if isinstance(target, str | Path) else target  # noqa: SIM115, ASYNC230
            try:
                for chunk in resp.iter_bytes(CHUNK):
                    f.write(chunk)
                    n += len(chunk)
            finally:
                if f is not target:
                    f.close()
        return n

    def write_archive(self, path: str, data: bytes | IO[bytes], *, request_timeout: Timeout = UNSET) -> ArchiveInfo:
        """Unpack an uncompressed tar (bytes or a binary file object, streamed) into the sandbox directory
        ``path``, created with its parents: existing files are replaced, directories merged into."""
        content = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else _chunks(data)
        resp = self._sandbox._http.send(
            rq.write_archive(self._sid, path), request_timeout=request_timeout, content=content
        )
        return ArchiveInfo.from_json(resp.json())

    def upload_dir(self, local_dir: str | Path, path: str, *, request_timeout: Timeout = UNSET) -> ArchiveInfo:
        """Copy a local directory's contents into the sandbox directory ``path`` (one streamed tar)."""
        with offload(_tar.pack_dir, local_dir) as packed:
            return self.write_archive(path, packed, request_timeout=request_timeout)

    def download_dir(
        self,
        path: str,
        local_dir: str | Path,
        *,
        on_skipped: Callable[[str, str], object] | None = None,
        request_timeout: Timeout = UNSET,
    ) -> int:
        """Copy a sandbox directory's contents into ``local_dir`` (created); returns the entries written. The
        tar is checked member by member: nothing is written outside ``local_dir``; symlinks pointing out of it
        and devices are left out (``on_skipped(name, why)`` hears of each; in the async flavour from a
        worker thread)."""
        with tempfile.SpooledTemporaryFile(_tar.SPOOL) as spool:
            self._save(rq.read_archive(self._sid, path), spool, request_timeout)
            spool.seek(0)
            return offload(_tar.unpack, spool, local_dir, on_skipped)

    def write(
        self,
        path: str,
        data: str | bytes | IO[bytes],
        *,
        mode: int | None = None,
        request_timeout: Timeout = UNSET,
    ) -> EntryInfo:
        """Write a file (parents are created). A file object is streamed in chunks."""
        content: Any
        if isinstance(data, str):
            content = data.encode("utf-8")
        elif isinstance(data, bytes | bytearray | memoryview):
            content = bytes(data)
        else:
            content = _chunks(data)
        resp = self._sandbox._http.send(
            rq.write_file(self._sid, path, mode), request_timeout=request_timeout, content=content
        )
        return EntryInfo.from_json(resp.json())

    def upload(self, path: str, source: str | Path, *, mode: int | None = None) -> EntryInfo:
        """Stream a local file into the sandbox."""
        with open(source, "rb") as f:  # noqa: ASYNC230 - reads are chunked and small
            return self.write(path, f, mode=mode)

    def list(self, path: str, *, depth: int = 1, request_timeout: Timeout = UNSET) -> list[EntryInfo]:
        resp = self._sandbox._http.send(rq.list_files(self._sid, path, depth), request_timeout=request_timeout)
        return [EntryInfo.from_json(e) for e in resp.json()]

    def get_info(self, path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = self._sandbox._http.send(rq.stat(self._sid, path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    def exists(self, path: str) -> bool:
        try:
            self.get_info(path)
        except FileNotFoundError_:
            return False
        return True

    def make_dir(self, path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = self._sandbox._http.send(rq.mkdir(self._sid, path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    def remove(self, path: str, *, recursive: bool = False, request_timeout: Timeout = UNSET) -> None:
        self._sandbox._http.send(rq.remove(self._sid, path, recursive), request_timeout=request_timeout)

    def rename(self, old_path: str, new_path: str, *, request_timeout: Timeout = UNSET) -> EntryInfo:
        resp = self._sandbox._http.send(rq.rename(self._sid, old_path, new_path), request_timeout=request_timeout)
        return EntryInfo.from_json(resp.json())

    @contextmanager
    def watch_dir(self, path: str, *, recursive: bool = False) -> Iterator[Iterator[FilesystemEvent]]:
        """Watch a sandbox directory (inotify, in the sandbox): iterate what the block gets for its changes as
        they happen, until the block ends or the directory is removed. ``recursive``: its subdirectories too, new
        ones as they appear. Each :class:`FilesystemEvent` has a ``type`` (create, write, remove, rename: the old
        name, chmod; overflow: events were lost) and a ``name`` relative to ``path``. Events made after the
        ``with`` line are all seen::

            with sbx.files.watch_dir("/work", recursive=True) as events:
                for event in events:
                    print(event.type, event.name)
        """
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415 - websockets only once one is used

        ws = self._sandbox._http.ws(rq.watch_path(self._sid), binary=False, query=rq.watch_query(path, recursive))
        try:
            try:
                rq.watch_message(ws.recv())  # "started": the watches are in place (or the error raises)
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                raise rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc
            yield _watch_events(ws)
        finally:
            ws.close()


def _watch_events(ws: ClientConnection) -> Iterator[FilesystemEvent]:
    from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

    try:
        for raw in ws:
            item = rq.watch_message(raw)
            if item == "end":
                return
            if isinstance(item, FilesystemEvent):
                yield item
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        raise rq.ws_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from exc


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk
