"""The agent's call errors: :class:`CallError` ends a call with a stable code, :func:`os_error` maps an
OSError to one."""

from __future__ import annotations

import errno
from typing import Any

# exec's errors for a program that is not there or cannot run (where a shell answers 127 or 126)
NOT_RUNNABLE = (errno.ENOENT, errno.EACCES, errno.ENOEXEC)
_ERRNO_CODES = {
    errno.ENOENT: "file_not_found",
    errno.EEXIST: "file_exists",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.ENOTEMPTY: "conflict",
    errno.ENOEXEC: "bad_request",  # a program exec cannot run (a script without #!, another architecture)
}


class CallError(Exception):
    """Ends a call with ``{"error": {"code", "message", "details"?}}``."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


def os_error(exc: OSError, path: str | None = None, **details: Any) -> CallError:
    """Map an OSError to a stable error code (``details`` join its errno in the error's details)."""
    code = _ERRNO_CODES.get(exc.errno or 0, "internal")
    message = exc.strerror or str(exc)
    where = path or exc.filename
    if where is not None:
        message = f"{message}: {where}"
    if exc.errno == errno.ENOTEMPTY:
        message += " (pass recursive=true to remove a non-empty directory)"
    return CallError(code, message, errno=exc.errno, **details)
