"""Every bound on user input, once. ``core/validate.py`` enforces them for any caller of the Manager;
``api/schemas.py`` (and the routes' query parameters) take them as pydantic bounds, so they show in
docs/openapi.json. A bound that depends on the host or the daemon's config (memory and cores of this host,
``max_timeout``) is checked by core only; the schema then carries the fixed ceiling above it.

Sizes are bytes of UTF-8 (core) and characters (the schema's ``maxLength``, a necessary condition: a character
is 1-4 bytes). Each number says why it is what it is.
"""

from __future__ import annotations

# -- resources of a sandbox (create, pools) ---------------------------------------------------------------------
DEFAULT_CPU = 1.0  # what a create (or a pool's member) gets when it names none
DEFAULT_MEMORY_MB = 512
DEFAULT_PIDS = 1024
MIN_CPU = 0.01  # cores: 1% of one core is the smallest quota the cgroup cpu controllers take usefully
MAX_CPU = 256.0  # cores: the schema's ceiling; core also refuses more than this host has
MIN_MEMORY_MB = 32  # below this the agent and a shell do not start reliably
MAX_MEMORY_MB = 1_048_576  # 1 TiB: the schema's ceiling; core also refuses more than this host has
MIN_PIDS = 16  # the agent, a shell and a pipeline
MAX_PIDS = 65_536  # the size of a sandbox's uid range; more is a fork bomb's budget, not a workload's
# disk: bytes a sandbox's writable layer may hold (btrfs qgroup of its upper; docs/snapshots.md "Disk limits").
# 0 means no limit (a daemon configured so, or a storage driver that cannot limit).
DEFAULT_DISK_MB = 10_240  # a daemon's default_disk_mb: 10 GiB, as E2B's default sandbox disk (Daytona: 3 GiB)
MIN_DISK_MB = 16  # the agent's files, a machine-id and a shell's history fit; less fails in surprising ways
MAX_DISK_MB = 16_777_216  # 16 TiB: the schema's ceiling (btrfs takes any 64-bit byte count)

# -- time -------------------------------------------------------------------------------------------------------
# The ceiling of every timeout field (a sandbox's lifetime, a command's limit). A daemon's ``max_timeout``
# (default 86,400 s) is at most this and is what core enforces for a sandbox's lifetime; larger values are a
# mistake, not a wish.
MAX_TIMEOUT_S = 31_536_000.0  # one year

# -- environment and metadata -------------------------------------------------------------------------------------
MAX_ENV_VARS = 1024
MAX_ENV_BYTES = 256 * 1024  # all of them: NAME=value\0 each (execve's whole budget is 2 MiB with the command)
MAX_ENV_NAME = 255
MAX_METADATA = 64  # keys; stored per sandbox and matched by list filters
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024

# -- commands -------------------------------------------------------------------------------------------------------
# Linux refuses one argv or env string above MAX_ARG_STRLEN (32 pages = 128 KiB, with its NUL) with E2BIG, and a
# string command is one argument of /bin/sh -c; the whole argv + env must fit ARG_MAX (2 MiB with an 8 MiB stack).
MAX_ARG_BYTES = 131_071
MAX_ARGV = 4096  # arguments of a list command
MAX_CMD_BYTES = 1024 * 1024  # all arguments of one command together
MAX_STDIN_BYTES = 8 * 1024 * 1024  # stdin given inline (JSON); larger input: the stream's stdin or a file
MAX_USER_NAME = 64
MAX_TAG = 255

# -- files ------------------------------------------------------------------------------------------------------------
MAX_PATH_BYTES = 4096  # PATH_MAX, with its NUL in the kernel; paths inside the sandbox, cwd
MAX_NAME = 255  # template, snapshot and backend names, hostnames' labels are 63
MAX_HOSTNAME = 63
