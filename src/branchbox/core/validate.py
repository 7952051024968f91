"""Validation of user input to Manager commands. Pure functions; errors are BadRequestError with what to change."""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping

from branchbox.errors import BadRequestError, LimitExceededError

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")

MAX_ENV_BYTES = 256 * 1024
MAX_ENV_VARS = 1024
MAX_METADATA = 64
MAX_METADATA_VALUE = 1024
MIN_MEMORY_MB = 32
MIN_PIDS = 16
MAX_PIDS = 65536


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
        raise LimitExceededError(f"env has {len(values)} variables; at most {MAX_ENV_VARS} are allowed")
    total = 0
    for k, v in values.items():
        if not isinstance(k, str) or not _ENV_KEY.match(k):
            raise BadRequestError(f"env name {k!r} is invalid: use letters, digits and _ and do not start with a digit")
        if not isinstance(v, str) or "\0" in v:
            raise BadRequestError(f"env value of {k} must be a string without NUL bytes")
        total += len(k) + len(v.encode()) + 2
    if total > MAX_ENV_BYTES:
        raise LimitExceededError(f"env is {total} bytes; at most {MAX_ENV_BYTES} bytes are allowed")
    return dict(values)


def metadata(values: Mapping[str, str] | None) -> dict[str, str]:
    if values is None:
        return {}
    if len(values) > MAX_METADATA:
        raise LimitExceededError(f"metadata has {len(values)} keys; at most {MAX_METADATA} are allowed")
    for k, v in values.items():
        if not isinstance(k, str) or not _METADATA_KEY.match(k):
            raise BadRequestError(f"metadata key {k!r} is invalid: 1-128 characters of letters, digits and _.:/-")
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


def resources(cpu: float, memory_mb: int, pids: int) -> None:
    ncpu = host_cpus()
    if isinstance(cpu, bool) or not isinstance(cpu, int | float) or not (0.01 <= cpu <= ncpu):
        raise BadRequestError(f"cpu is {cpu!r}: pass a number of cores between 0.01 and {ncpu} (this host)")
    mem_max = host_memory_mb()
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not (MIN_MEMORY_MB <= memory_mb <= mem_max):
        raise BadRequestError(f"memory_mb is {memory_mb!r}: pass an integer between {MIN_MEMORY_MB} and {mem_max}")
    if isinstance(pids, bool) or not isinstance(pids, int) or not (MIN_PIDS <= pids <= MAX_PIDS):
        raise BadRequestError(f"pids is {pids!r}: pass an integer between {MIN_PIDS} and {MAX_PIDS}")


def hostname(value: str) -> str:
    if not isinstance(value, str) or not _HOSTNAME.match(value):
        raise BadRequestError(f"hostname {value!r} is invalid: 1-63 lowercase letters, digits and inner dashes")
    return value
