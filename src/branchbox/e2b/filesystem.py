"""envd's ``filesystem.Filesystem`` service (Stat, ListDir, MakeDir, Remove, Move) over the Manager's file calls."""

from __future__ import annotations

import stat as stat_
from collections.abc import Awaitable
from typing import Any, TypeVar

from branchbox.e2b.connect import RpcError, from_branchbox
from branchbox.e2b.files import FilesError, give_to
from branchbox.e2b.state import XATTR_PREFIX, E2BState, iso, resolve_path
from branchbox.errors import BranchboxError, FileNotFoundInSandboxError
from branchbox.models import FileEntry

Message = dict[str, Any]
T = TypeVar("T")
MAX_DEPTH = 32
_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
_IFMT = {"file": stat_.S_IFREG, "dir": stat_.S_IFDIR, "symlink": stat_.S_IFLNK}


def entry_json(e: FileEntry) -> Message:
    """E2B's ``EntryInfo`` (int64 size as a JSON string, as protobuf's JSON mapping has it)."""
    out: Message = {
        "name": e.name,
        "type": _TYPES.get(e.type, "FILE_TYPE_UNSPECIFIED"),
        "path": e.path,
        "size": str(e.size),
        "mode": e.mode & 0o7777,
        "permissions": stat_.filemode(_IFMT.get(e.type, 0) | (e.mode & 0o7777)),
        "owner": e.owner,
        "group": e.group,
        "modifiedTime": iso(e.mtime),
        "isSymlink": e.type == "symlink",
    }
    if e.symlink_target is not None:
        out["symlinkTarget"] = e.symlink_target
    meta = {k[len(XATTR_PREFIX) :]: v for k, v in e.xattrs.items() if k.startswith(XATTR_PREFIX)}
    if meta:
        out["metadata"] = meta
    return out


def _path(req: Message, key: str, user: str | None) -> str:
    value = req.get(key)
    if not isinstance(value, str) or not value:
        raise RpcError("invalid_argument", f"{key} (a path) is required")
    return resolve_path(value, user)


async def _call(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except BranchboxError as exc:
        raise from_branchbox(exc) from exc


class FilesystemService:
    def __init__(self, state: E2BState) -> None:
        self.state = state

    async def stat(self, sid: str, req: Message, user: str | None) -> Message:
        path = _path(req, "path", user)
        return {"entry": entry_json(await _call(self.state.manager.stat(sid, path, xattrs=XATTR_PREFIX)))}

    async def list_dir(self, sid: str, req: Message, user: str | None) -> Message:
        depth = req.get("depth") or 1
        if not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
            raise RpcError("invalid_argument", f"depth must be 1 to {MAX_DEPTH}")
        path = _path(req, "path", user)
        entries = await _call(self.state.manager.list_files(sid, path, depth=depth, xattrs=XATTR_PREFIX))
        return {"entries": [entry_json(e) for e in entries]}

    async def make_dir(self, sid: str, req: Message, user: str | None) -> Message:
        path = _path(req, "path", user)
        try:
            await self.state.manager.stat(sid, path)
        except FileNotFoundInSandboxError:
            entry = await _call(self.state.manager.mkdir(sid, path))
            try:
                await give_to(self.state, sid, [path], user)
            except FilesError as exc:
                raise RpcError("invalid_argument", exc.message) from exc
            return {"entry": entry_json(entry)}
        except BranchboxError as exc:
            raise from_branchbox(exc) from exc
        raise RpcError("already_exists", f"{path} already exists")

    async def remove(self, sid: str, req: Message, user: str | None) -> Message:
        await _call(self.state.manager.remove(sid, _path(req, "path", user), recursive=True))
        return {}

    async def move(self, sid: str, req: Message, user: str | None) -> Message:
        src, dst = _path(req, "source", user), _path(req, "destination", user)
        return {"entry": entry_json(await _call(self.state.manager.rename(sid, src, dst)))}
