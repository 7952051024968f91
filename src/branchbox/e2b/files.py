"""envd's ``/files`` endpoint: ``GET`` streams a file out (``Manager.download``), ``POST`` writes files in
(``Manager.upload``): an ``application/octet-stream`` body (optionally ``Content-Encoding: gzip``) for one file, or a
``multipart/form-data`` body whose parts are named by their target paths. Answers ``[{"name", "type", "path"}]``."""

from __future__ import annotations

import posixpath
import re
import zlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from branchbox.e2b.state import XATTR_PREFIX, E2BState, resolve_path, run_as
from branchbox.errors import BranchboxError

CHUNK = 256 * 1024
MAX_FILES = 1000  # parts of one multipart upload


class FilesError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _status(exc: BranchboxError) -> int:
    if exc.code in ("sandbox_not_found", "agent_disconnected"):
        return 502
    if exc.code == "limit_exceeded":
        return 507
    return exc.http_status if exc.http_status < 500 else 500


METADATA_PREFIX = "x-metadata-"  # envd 0.6.2's per-file metadata, kept as user.e2b.* extended attributes
MAX_METADATA = 64  # keys per upload
MAX_METADATA_KEY = 200  # characters (an extended attribute's name is at most 255 bytes with its prefix)
MAX_METADATA_VALUE = 4096  # characters
_META_KEY = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_META_VALUE = re.compile(r"^[\x20-\x7e]*$")


async def give_to(state: E2BState, sid: str, paths: list[str], user: str | None) -> None:
    """Directories made for a user other than root (``MakeDir``) become that user's, as envd makes them (the agent
    works as root): one ``chown`` in the sandbox. Uploads need none: the agent gives a new file to its owner before
    renaming it into place."""
    if run_as(user) is None or not paths:
        return
    res = await state.manager.exec(sid, ["chown", "--", f"{user}:", *paths], timeout=60)
    if res.exit_code != 0:
        raise FilesError(400, f"cannot give the files to {user!r}: {res.stderr_text.strip()[:300]}")


def _written(path: str, meta: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": posixpath.basename(path), "type": "file", "path": path}
    if meta:
        out["metadata"] = meta
    return out


def metadata_of(headers: dict[str, str]) -> dict[str, str]:
    """envd 0.6.2's per-file metadata: ``X-Metadata-<key>: <value>`` headers, keys lowercased; bounded and
    checked as the SDK checks them (HTTP token keys, printable ASCII values)."""
    meta = {k[len(METADATA_PREFIX) :]: v for k, v in headers.items() if k.startswith(METADATA_PREFIX)}
    if len(meta) > MAX_METADATA:
        raise FilesError(400, f"at most {MAX_METADATA} metadata keys per upload")
    for k, v in meta.items():
        if not _META_KEY.match(k) or len(k) > MAX_METADATA_KEY:
            raise FilesError(400, f"metadata key {k!r} is invalid: 1-{MAX_METADATA_KEY} HTTP token characters")
        if not _META_VALUE.match(v) or len(v) > MAX_METADATA_VALUE:
            raise FilesError(400, f"metadata value of {k!r} is invalid: printable ASCII, at most {MAX_METADATA_VALUE}")
    return meta


async def download(state: E2BState, sid: str, path: str) -> tuple[bytes, AsyncIterator[bytes]]:
    """The first chunk (so that errors come before the headers) and the rest of the file."""
    chunks = state.manager.download(sid, path)
    try:
        first = await anext(chunks, b"")
    except BranchboxError as exc:
        raise FilesError(_status(exc), exc.message) from exc
    return first, chunks


async def _discard(receive: Receive) -> None:
    """Read a refused request's body to its end (the request guard bounds its size)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _body(receive: Receive, gzipped: bool) -> AsyncIterator[bytes]:
    inflate = zlib.decompressobj(wbits=31) if gzipped else None
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise FilesError(400, "the client went away during the upload")
        data = message.get("body", b"")
        if data:
            if inflate is None:
                yield data
            else:
                try:
                    while data:
                        out = inflate.decompress(data, CHUNK)
                        data = inflate.unconsumed_tail
                        if out:
                            yield out
                except zlib.error as exc:
                    raise FilesError(400, f"the gzip body is corrupt ({exc})") from exc
        if not message.get("more_body", False):
            return


async def _upload_file(file: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await file.read(CHUNK):
        yield chunk


async def upload(
    state: E2BState, sid: str, scope: Scope, receive: Receive, send: Send, query: dict[str, str], user: str | None
) -> list[dict[str, Any]]:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    try:
        meta = metadata_of(headers)
    except FilesError:
        await _discard(receive)  # the client sends it all before it reads an answer
        raise
    xattrs = {XATTR_PREFIX + k: v for k, v in meta.items()}
    ctype = headers.get("content-type", "")
    mgr = state.manager
    try:
        if ctype.startswith("multipart/form-data"):
            request = Request(scope, receive, send)
            form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
            try:
                parts = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
                if not parts:
                    raise FilesError(400, "the multipart body holds no file part")
                out = []
                for part in parts:
                    name = query.get("path") if len(parts) == 1 and query.get("path") else part.filename
                    if not name:
                        raise FilesError(400, "a file part has no filename: name each part by its target path")
                    path = resolve_path(name, user)
                    await mgr.upload(sid, path, _upload_file(part), owner=run_as(user), xattrs=xattrs)
                    out.append(_written(path, meta))
                return out
            finally:
                await form.close()
        if "path" not in query:
            raise FilesError(400, "path= is required for an octet-stream upload")
        path = resolve_path(query["path"], user)
        gzipped = headers.get("content-encoding", "").lower() == "gzip"
        await mgr.upload(sid, path, _body(receive, gzipped), owner=run_as(user), xattrs=xattrs)
        return [_written(path, meta)]
    except BranchboxError as exc:
        raise FilesError(_status(exc), exc.message) from exc


def read_user(query: dict[str, str], header_user: str | None) -> str | None:
    return query.get("username") or header_user


def required_path(query: dict[str, str]) -> str:
    if not query.get("path"):
        raise FilesError(400, "path= is required")
    return query["path"]
