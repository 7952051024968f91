"""Users and groups of the sandbox, read by the agent itself from the sandbox's ``/etc/passwd`` and ``/etc/group``.

Never through NSS: glibc's ``getpwnam``/``getgrouplist`` read the sandbox's ``/etc/nsswitch.conf`` and ``dlopen``
the ``libnss_*.so`` modules it names, which are files of the sandbox: code the sandbox chose, loaded into PID 1
(the pattern of CVE-2019-14271). So only the ``files`` database exists here, parsed as glibc's ``files`` module
does (``name:passwd:uid:gid:gecos:home:shell`` and ``name:passwd:gid:member,...``; blank, ``#`` and NIS ``+``/``-``
lines and malformed entries are skipped). The files are the sandbox's, so they are read defensively: a regular
file only (a FIFO or device in their place cannot block PID 1), at most ``MAX_BYTES``. Stdlib only.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

MAX_BYTES = 16 << 20  # a larger /etc/passwd or /etc/group is refused (PID 1 would otherwise read it whole)


class UserError(Exception):
    """The user cannot be resolved (unknown name, unreadable database); the message says what to change."""


class User(NamedTuple):
    uid: int
    gid: int
    groups: list[int]  # the primary gid first, then every group listing the user as a member (as getgrouplist)
    name: str
    home: str


def _records(path: str, fields: int) -> list[list[str]]:
    """The well-formed lines of a colon-separated database, split (at least ``fields`` fields each)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path} is not a regular file")
        if st.st_size > MAX_BYTES:
            raise UserError(f"{path} is larger than {MAX_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise UserError(f"{path} is larger than {MAX_BYTES} bytes")
    out = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        if not line or line[0] in "#+-":
            continue
        parts = line.split(":")
        if len(parts) >= fields and parts[0]:
            out.append(parts)
    return out


def _id(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) <= 10 and int(text) < 1 << 32 else None


def lookup(user: str | int, etc: str = "/etc") -> User:
    """The user ``user`` (a name, or a uid as int or digits). A uid without a passwd entry is that uid with the
    same gid, no other groups and home ``/``; an unknown name is :class:`UserError`."""
    passwd = _records(f"{etc}/passwd", 7)
    numeric = isinstance(user, int) or user.isdigit()
    found: list[str] | None = None
    for rec in passwd:
        uid = _id(rec[2])
        if uid is None or _id(rec[3]) is None:
            continue
        if (uid == int(user)) if numeric else (rec[0] == user):
            found = rec
            break
    if found is None:
        if not numeric:
            raise UserError(f"unknown user {user!r}: create it in the template or pass a uid")
        uid = int(user)
        return User(uid, uid, [uid], str(uid), "/")
    name, uid, gid = found[0], int(found[2]), int(found[3])
    groups = [gid]
    for rec in _records(f"{etc}/group", 4):
        member_gid = _id(rec[2])
        if member_gid is not None and member_gid not in groups and name in rec[3].split(","):
            groups.append(member_gid)
    return User(uid, gid, groups, name, found[5] or "/")


_names_cache: dict[str, tuple[tuple[int, int, int], dict[int, str]]] = {}


def _id_names(path: str, id_field: int) -> dict[int, str]:
    """id -> name of a database, re-read only when the file changes (size, mtime, inode), first name wins."""
    try:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        key = (-1, -1, -1)
    cached = _names_cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    names: dict[int, str] = {}
    try:
        records = _records(path, id_field + 1)
    except UserError:
        records = []
    for rec in records:
        num = _id(rec[id_field])
        if num is not None:
            names.setdefault(num, rec[0])
    _names_cache[path] = (key, names)
    return names


def owner_names(uid: int, gid: int, etc: str = "/etc") -> tuple[str, str]:
    """The user and group names of a file's owner as ``ls -l`` shows them (the number when it has no name)."""
    user = _id_names(f"{etc}/passwd", 2).get(uid)
    group = _id_names(f"{etc}/group", 2).get(gid)
    return user if user is not None else str(uid), group if group is not None else str(gid)
