"""Validation of user input to Manager commands. Pure functions; errors are BadRequestError with what to change."""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping, Sequence

from branchbox import limits
from branchbox.errors import BadRequestError, LimitExceededError, NotSupportedError, PayloadTooLargeError
from branchbox.limits import (
    MAX_ARG_BYTES,
    MAX_ARGV,
    MAX_CMD_BYTES,
    MAX_CPU,
    MAX_ENV_BYTES,
    MAX_ENV_NAME,
    MAX_ENV_VARS,
    MAX_MEMORY_MB,
    MAX_METADATA,
    MAX_METADATA_VALUE,
    MAX_PATH_BYTES,
    MAX_PIDS,
    MAX_STDIN_BYTES,
    MIN_CPU,
    MIN_MEMORY_MB,
    MIN_PIDS,
)
from branchbox.models import ON_TIMEOUT, TimeoutPolicy

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_METADATA_KEY = re.compile(rf"^[A-Za-z0-9_.:/-]{{1,{limits.MAX_METADATA_KEY}}}$")


@functools.cache
def host_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


@functools.cache
def host_cpus() -> int:
    """Cores of this host (read once: ``os.cpu_count`` reads sysfs on every call)."""
    return os.cpu_count() or 1


def env(values: Mapping[str, str] | None) -> dict[str, str]:
    if values is None:
        return {}
    if len(values) > MAX_ENV_VARS:
        raise PayloadTooLargeError(f"env has {len(values)} variables; at most {MAX_ENV_VARS} are allowed")
    total = 0
    for k, v in values.items():
        if not isinstance(k, str) or not _ENV_KEY.match(k) or len(k) > MAX_ENV_NAME:
            raise BadRequestError(
                f"env name {k[:64]!r} is invalid: use letters, digits and _ (at most {MAX_ENV_NAME}) and do not "
                "start with a digit"
            )
        if not isinstance(v, str) or "\0" in v:
            raise BadRequestError(f"env value of {k} must be a string without NUL bytes")
        size = len(k) + len(v.encode()) + 1  # NAME=value (execve's bound is on each string, with its NUL)
        if size > MAX_ARG_BYTES:
            raise PayloadTooLargeError(f"env variable {k} is {size} bytes; at most {MAX_ARG_BYTES} (Linux's limit)")
        total += size + 1
    if total > MAX_ENV_BYTES:
        raise PayloadTooLargeError(f"env is {total} bytes; at most {MAX_ENV_BYTES} bytes are allowed")
    return dict(values)


def metadata(values: Mapping[str, str] | None) -> dict[str, str]:
    if values is None:
        return {}
    if len(values) > MAX_METADATA:
        raise PayloadTooLargeError(f"metadata has {len(values)} keys; at most {MAX_METADATA} are allowed")
    for k, v in values.items():
        if not isinstance(k, str) or not _METADATA_KEY.match(k):
            raise BadRequestError(
                f"metadata key {str(k)[:64]!r} is invalid: 1-{limits.MAX_METADATA_KEY} characters of letters, "
                "digits and _.:/-"
            )
        if not isinstance(v, str) or len(v) > MAX_METADATA_VALUE:
            raise BadRequestError(f"metadata value of {k!r} must be a string of at most {MAX_METADATA_VALUE} chars")
    return dict(values)


def timeout(value: float | None, *, default: float, maximum: float) -> float | None:
    """``None`` means the default; 0 or less is an error; returns seconds."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise BadRequestError("timeout must be a number of seconds")
    if value <= 0:
        raise BadRequestError(f"timeout is {value}: pass a positive number of seconds (at most {maximum:g})")
    if value > maximum:
        raise LimitExceededError(f"timeout is {value:g} s; the maximum is {maximum:g} s (set max_timeout to raise it)")
    return float(value)


def timeout_policy(on_timeout: str, auto_resume: bool, ttl: float | None, *, pause: bool) -> TimeoutPolicy:
    """A create's :class:`TimeoutPolicy`; ``pause``: whether the sandbox's backend can pause sandboxes."""
    if on_timeout not in ON_TIMEOUT:
        raise BadRequestError(f"on_timeout is {on_timeout!r}: pass one of {', '.join(ON_TIMEOUT)}")
    if not isinstance(auto_resume, bool):
        raise BadRequestError(f"auto_resume is {auto_resume!r}: pass true or false")
    if auto_resume and on_timeout != "pause":
        raise BadRequestError("auto_resume needs on_timeout='pause' (a destroyed sandbox cannot resume)")
    if on_timeout == "pause" and not pause:
        raise NotSupportedError("this backend cannot pause sandboxes: on_timeout='pause' needs one that can")
    return TimeoutPolicy(on_timeout=on_timeout, auto_resume=auto_resume, timeout=ttl)


def resources(cpu: float, memory_mb: int, pids: int) -> None:
    ncpu = min(host_cpus(), MAX_CPU)
    if isinstance(cpu, bool) or not isinstance(cpu, int | float) or not (MIN_CPU <= cpu <= ncpu):
        raise BadRequestError(f"cpu is {cpu!r}: pass a number of cores between {MIN_CPU} and {ncpu:g} (this host)")
    mem_max = min(host_memory_mb(), MAX_MEMORY_MB)
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not (MIN_MEMORY_MB <= memory_mb <= mem_max):
        raise BadRequestError(f"memory_mb is {memory_mb!r}: pass an integer between {MIN_MEMORY_MB} and {mem_max}")
    if isinstance(pids, bool) or not isinstance(pids, int) or not (MIN_PIDS <= pids <= MAX_PIDS):
        raise BadRequestError(f"pids is {pids!r}: pass an integer between {MIN_PIDS} and {MAX_PIDS}")


def command(cmd: str | Sequence[str]) -> None:
    """A command the agent can start: a non-empty string (run by /bin/sh -c) or argv list, without NUL bytes, in
    Linux's argument bounds (:mod:`branchbox.limits`)."""
    args = [cmd] if isinstance(cmd, str) else cmd
    if not isinstance(args, Sequence) or not args or not all(isinstance(a, str) for a in args):
        raise BadRequestError("cmd must be a non-empty string or a non-empty list of strings")
    if not isinstance(cmd, str) and len(args) > MAX_ARGV:
        raise PayloadTooLargeError(f"cmd has {len(args)} arguments; at most {MAX_ARGV} are allowed")
    if isinstance(cmd, str) and not cmd:
        raise BadRequestError("cmd is empty: pass a command line or an argv list")
    total = 0
    for a in args:
        if "\0" in a:
            raise BadRequestError("cmd must not contain NUL bytes")
        size = len(a.encode())
        if size > MAX_ARG_BYTES:
            raise PayloadTooLargeError(
                f"a cmd argument is {size} bytes; at most {MAX_ARG_BYTES} (Linux's limit for one argument; a "
                "string cmd is one argument of /bin/sh -c): write a long script to a file and run that"
            )
        total += size + 1
    if total > MAX_CMD_BYTES:
        raise PayloadTooLargeError(f"cmd is {total} bytes; at most {MAX_CMD_BYTES}: write it to a file and run that")


def stdin(data: bytes | None) -> None:
    if data is not None and len(data) > MAX_STDIN_BYTES:
        raise PayloadTooLargeError(
            f"stdin is {len(data)} bytes; at most {MAX_STDIN_BYTES} inline: write the input to a file, or stream it"
        )


def path(value: str, *, what: str = "path") -> str:
    """A path inside the sandbox: non-empty, no NUL, at most PATH_MAX bytes."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise BadRequestError(f"{what} must be a non-empty string without NUL bytes")
    if len(value.encode()) >= MAX_PATH_BYTES:
        raise PayloadTooLargeError(f"{what} is {len(value.encode())} bytes; at most {MAX_PATH_BYTES - 1} (PATH_MAX)")
    return value


def hostname(value: str) -> str:
    if not isinstance(value, str) or not _HOSTNAME.match(value):
        raise BadRequestError(f"hostname {value!r} is invalid: 1-63 lowercase letters, digits and inner dashes")
    return value
