"""Daemon configuration: flags > environment (``BRANCHBOX_*``) > TOML config file > defaults.

The config file is ``--config PATH``, else ``$BRANCHBOX_CONFIG``, else /etc/branchbox/config.toml if it
exists. Its keys are the field names of :class:`DaemonConfig` at top level (or grouped under ``[server]``,
``[manager]``, ``[log]`` tables, which is the same). Each field's environment variable is ``BRANCHBOX_`` + the
upper-case name, e.g. ``BRANCHBOX_PORT=7078``; lists (``api_key_hashes``) are comma-separated there.

Warm pools are ``[pools.<template>]`` tables (file only, no environment variables) whose keys are the fields of
:class:`~branchbox.core.pool.PoolConfig` except ``template`` and ``backend``; a pool on a backend other than the
default one is ``[pools."<template>@<backend>"]``::

    [pools.default]
    min_size = 4
    target_free = 4
    max_size = 16
    memory_mb = 256

    [pools."default@microvm"]
    min_size = 1
    memory_mb = 256

A daemon joins a fleet (docs/fleet.md) with a ``[fleet]`` table (``address = "HEAD:6379"``, ``name``, ``labels =
{region = "eu"}``, ``memory_mb``, ``cpu``, ``backends``, ``url``...; the ``BRANCHBOX_FLEET_*`` variables and the
``--fleet`` flags win over it), checked by :class:`branchbox.fleet.node.JoinSettings`.

Networking (docs/networking.md) is on by default: ``network = false`` gives sandboxes loopback only. The
``network_*`` settings are those of :class:`~branchbox.net.NetworkSettings`.

Host-unique names (neighbouring daemons, :mod:`branchbox.daemon.claims`): ``cgroup_parent``, ``network_table``,
``network_if_prefix`` and ``network_subnet`` are None unless configured. ``branchbox serve`` then resolves them
(what the data dir's ``host.json`` recorded, else derived from the data dir: the cgroup parent from its real
path, the table and prefix from the cgroup parent, the subnet allocated) and claims them host-wide before the
Manager starts (:meth:`DaemonConfig.with_names`).

API keys are never stored in clear: ``api_key_hashes`` holds sha256 hex digests (``branchbox key new`` prints
a key and its digest) and ``api_keys_file`` names a file with one digest per line (``#`` comments allowed).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from branchbox.api.auth import is_key_hash
from branchbox.api.settings import ApiSettings
from branchbox.backends.idranges import RANGE_SIZE
from branchbox.core.pool import PoolConfig
from branchbox.core.settings import DEFAULT_DATA_DIR, ManagerSettings, WorkspaceSettings
from branchbox.daemon.claims import LEGACY_CGROUP_PARENT, LEGACY_SUBNET, HostNames, Wanted, network_names
from branchbox.errors import BadRequestError
from branchbox.limits import MAX_TIMEOUT_S, MIN_DISK_MB
from branchbox.net.settings import NetworkSettings
from branchbox.workspaces.sshauth import check_known_hosts

DEFAULT_CONFIG_FILE = Path("/etc/branchbox/config.toml")
_TABLES = ("server", "manager", "log")
_POOL_KEYS = tuple(f.name for f in fields(PoolConfig) if f.name not in ("template", "backend"))


def _core(name: str, settings: Any = ManagerSettings) -> Any:
    """The default the core's settings dataclass gives ``name``."""
    return next(f.default for f in fields(settings) if f.name == name)


class ConfigError(BadRequestError):
    """The configuration is invalid; the message names the setting and its source."""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    host: str = "127.0.0.1"
    port: int = 7077
    data_dir: Path = DEFAULT_DATA_DIR
    templates_dir: Path | None = None
    # the core's settings take their defaults from core/settings.py (one place; DaemonConfig repeats none)
    default_timeout: float = _core("default_timeout")
    max_timeout: float = _core("max_timeout")
    max_sandboxes: int = _core("max_sandboxes")
    max_output_mb: int = _core("max_output_bytes") >> 20  # a run keeps at most this much of each output stream
    default_backend: str = _core("default_backend")
    keep_sandboxes_on_shutdown: bool = _core("keep_sandboxes_on_shutdown")
    # host-unique names: None (not configured) is resolved by the daemon's claim (derived from data_dir)
    cgroup_parent: str | None = None
    api_key_hashes: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    require_auth: bool | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names the API answers besides localhost/the bind host/IP literals
    allowed_origins: tuple[str, ...] = ()  # browser origins whose pages may call the API
    port_domain: str = "localhost"  # sandbox ports at {port}-{sandbox_id}.{port_domain}
    max_body_bytes: int = 16 * 1024 * 1024
    max_upload_bytes: int = 8 * 1024 * 1024 * 1024
    log_level: str = "info"
    log_format: str = "json"  # json | console
    graceful_timeout: float = 10.0  # seconds to let open requests and streams finish on SIGTERM
    event_loop: str = "auto"  # asyncio | uvloop | auto (uvloop when installed)
    network: bool = True  # false: sandboxes get loopback only
    network_subnet: str | None = None  # one /30 per sandbox (default: a free /19 of 10.224.0.0/11, allocated)
    network_table: str | None = None  # nftables table (default: from cgroup_parent)
    network_if_prefix: str | None = None  # host-side veth name prefix (default: from cgroup_parent)
    network_dns_upstream: str | None = None  # host[:port]; default: the first nameserver of /etc/resolv.conf
    network_dns_port: int = _core("dns_port", NetworkSettings)  # the host-side DNS forwarder's port (0: any free port)
    git_cache_budget_mb: int = _core("cache_budget_mb", WorkspaceSettings)  # git workspace cache, LRU-evicted
    git_ref_ttl: float = _core("ref_ttl", WorkspaceSettings)  # seconds a branch's commit is reused (0: always ask)
    git_allow_cidrs: tuple[str, ...] = ()  # blocked ranges (private, loopback...) git may fetch from anyway
    git_ssh_known_hosts: Path | None = None  # host keys every ssh fetch is checked against (strict; see workspaces)
    tmp_tmpfs_mb: int = _core("tmp_tmpfs_mb")  # containers: a memory-backed /tmp of this size; 0: on disk
    default_disk_mb: int = _core("default_disk_mb")  # a sandbox's disk when the create names none (0: no limit)
    reserve_mb: int = _core("reserve_mb")  # free space kept for the daemon's state: creates refused below it
    snapshot_budget_mb: int = _core("snapshot_budget_mb")  # all snapshot layers together (0: no budget)
    # per-sandbox host uid ranges (issue 22.1): a block of this many ranges of 65536 ids (0: every sandbox maps to
    # the one canonical range, as before); its first host uid is allocated host-wide unless configured
    uid_ranges: int = 1024
    uid_first: int | None = None
    pools: tuple[PoolConfig, ...] = ()  # [pools.<template>] tables; only from the config file
    # the [fleet] table as written (only from the config file; BRANCHBOX_FLEET_* and the --fleet flags win over
    # it): read and checked by branchbox.fleet.node.JoinSettings when the daemon joins a fleet (docs/fleet.md)
    fleet: Mapping[str, Any] = field(default_factory=dict)

    def wanted_names(self) -> Wanted:
        """The host-unique names as configured (None: not configured)."""
        return Wanted(
            network=self.network,
            cgroup_parent=self.cgroup_parent,
            table=self.network_table,
            if_prefix=self.network_if_prefix,
            subnet=self.network_subnet,
            uid_first=self.uid_first,
            uid_ranges=self.uid_ranges,
        )

    def with_names(self, names: HostNames) -> DaemonConfig:
        """This config with the names a claim resolved."""
        return dataclasses.replace(
            self,
            cgroup_parent=names.cgroup_parent,
            network_table=names.table,
            network_if_prefix=names.if_prefix,
            network_subnet=names.subnet,
            uid_first=names.uid_first,
        )

    def network_settings(self) -> NetworkSettings | None:
        """Networking as configured; names not resolved yet (see :meth:`with_names`) take the legacy ones."""
        if not self.network:
            return None
        table, prefix = network_names(self.cgroup_parent or LEGACY_CGROUP_PARENT)
        try:
            return NetworkSettings(
                subnet=self.network_subnet or LEGACY_SUBNET,
                table=self.network_table or table,
                if_prefix=self.network_if_prefix or prefix,
                dns_upstream=self.network_dns_upstream,
                dns_port=self.network_dns_port,
            )
        except BadRequestError as exc:
            raise ConfigError(f"network settings: {exc.message}") from exc

    def manager_settings(self) -> ManagerSettings:
        if self.max_output_mb < 1:
            raise ConfigError(f"max_output_mb must be at least 1 (MiB per output stream), not {self.max_output_mb}")
        for name in ("default_disk_mb", "reserve_mb", "snapshot_budget_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more (MiB), not {getattr(self, name)}")
        if 0 < self.default_disk_mb < MIN_DISK_MB:
            raise ConfigError(
                f"default_disk_mb must be 0 (no limit) or at least {MIN_DISK_MB}, not {self.default_disk_mb}"
            )
        if self.uid_ranges < 0 or (self.uid_first is not None and self.uid_first % RANGE_SIZE):
            raise ConfigError(
                f"uid_ranges must be 0 or more and uid_first a multiple of {RANGE_SIZE}, not {self.uid_ranges} and "
                f"{self.uid_first}"
            )
        ranges = (self.uid_first, self.uid_ranges) if self.uid_first is not None and self.uid_ranges else None
        return ManagerSettings(
            data_dir=self.data_dir,
            uid_ranges=ranges,
            templates_dir=self.templates_dir,
            default_timeout=self.default_timeout,
            max_timeout=self.max_timeout,
            max_sandboxes=self.max_sandboxes,
            max_output_bytes=self.max_output_mb << 20,
            default_backend=self.default_backend,
            keep_sandboxes_on_shutdown=self.keep_sandboxes_on_shutdown,
            cgroup_parent=self.cgroup_parent or LEGACY_CGROUP_PARENT,
            tmp_tmpfs_mb=self.tmp_tmpfs_mb,
            default_disk_mb=self.default_disk_mb,
            reserve_mb=self.reserve_mb,
            snapshot_budget_mb=self.snapshot_budget_mb,
            pools=self.pools,
            network=self.network_settings(),
            workspaces=WorkspaceSettings(
                cache_budget_mb=self.git_cache_budget_mb,
                ref_ttl=self.git_ref_ttl,
                allow_cidrs=self.git_allow_cidrs,
                ssh_known_hosts=self._ssh_known_hosts(),
            ),
        )

    def _ssh_known_hosts(self) -> Path | None:
        """``git_ssh_known_hosts``, checked: a readable file of known_hosts lines at a path without spaces (ssh
        takes a space-separated list of such files)."""
        path = self.git_ssh_known_hosts
        if path is None:
            return None
        if any(c.isspace() for c in str(path)) or not path.is_absolute():
            raise ConfigError(f"git_ssh_known_hosts must be an absolute path without spaces, not {str(path)!r}")
        try:
            check_known_hosts(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read git_ssh_known_hosts {path}: {exc.strerror}") from exc
        except BadRequestError as exc:
            raise ConfigError(f"git_ssh_known_hosts {path}: {exc.message}") from exc
        return path

    def api_settings(self, version: str) -> ApiSettings:
        return ApiSettings(
            host=self.host,
            port=self.port,
            api_key_hashes=self.all_key_hashes(),
            require_auth=self.require_auth,
            version=version,
            allowed_hosts=self.allowed_hosts,
            allowed_origins=self.allowed_origins,
            port_domain=self.port_domain,
            max_body_bytes=self.max_body_bytes,
            max_upload_bytes=self.max_upload_bytes,
        )

    def all_key_hashes(self) -> tuple[str, ...]:
        hashes = list(self.api_key_hashes)
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read api_keys_file {self.api_keys_file}: {exc.strerror}") from exc
            for n, raw in enumerate(text.splitlines(), 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                if not is_key_hash(line.lower()):
                    raise ConfigError(
                        f"{self.api_keys_file}:{n} is not a sha256 hex digest: store hashes, not keys "
                        "(`branchbox key new` prints both)"
                    )
                hashes.append(line.lower())
        return tuple(hashes)


_CGROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELDS = {f.name: f for f in fields(DaemonConfig) if f.name not in ("pools", "fleet")}


def _convert(name: str, value: Any, source: str) -> Any:
    """Turn a TOML/env/flag value into the field's type, or raise ConfigError naming the source."""
    try:
        if name in ("allowed_hosts", "allowed_origins", "git_allow_cidrs"):
            return _names(value)
        return _coerce(str(_FIELDS[name].type), value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {name}={value!r} from {source}: {exc}") from exc


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _number(value: Any, kind: type[int] | type[float]) -> int | float:
    if isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got a boolean")
    return kind(value)


def _hashes(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = tuple(str(i).strip().lower() for i in items if str(i).strip())
    if any(not is_key_hash(i) for i in out):
        raise ValueError("every entry must be a sha256 hex digest of a key, not the key itself")
    return out


def _names(value: Any) -> tuple[str, ...]:
    """A list of names (TOML list, or comma-separated in the environment)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(i).strip() for i in items if str(i).strip())


def _coerce(kind: str, value: Any) -> Any:  # noqa: PLR0911 - a flat dispatch on the field type
    optional = "None" in kind
    if value is None or (optional and isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise ValueError("must not be empty")
    if kind.startswith("bool"):
        return _bool(value)
    if kind == "int":
        return _number(value, int)
    if kind == "float":
        return _number(value, float)
    if kind.startswith("Path"):
        return Path(str(value)).expanduser()
    if kind.startswith("tuple"):
        return _hashes(value)
    return str(value)


def _pool_value(key: str, value: Any) -> Any:
    """TOML already types values; only reject what PoolConfig would not catch (bools as numbers, text)."""
    if key == "reuse":
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    if key == "cpu":
        if value <= 0:
            raise ValueError("must be > 0")
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(value)
    return value


def parse_pools(doc: Any, source: str) -> tuple[PoolConfig, ...]:
    """``[pools.<template>]`` tables -> PoolConfigs; errors name the section, the field and ``source``."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"pools in {source} must be tables: [pools.<template>]")
    out: list[PoolConfig] = []
    for name, table in doc.items():
        section = f"[pools.{name}]" if "@" not in name else f'[pools."{name}"]'
        template, _, backend = str(name).partition("@")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{section} in {source} must be a table of settings ({', '.join(_POOL_KEYS)})")
        unknown = sorted(set(table) - set(_POOL_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)} in {section} of {source}; known: {', '.join(_POOL_KEYS)}"
            )
        values: dict[str, Any] = {}
        for key, value in table.items():
            try:
                values[key] = _pool_value(key, value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"invalid {key}={value!r} in {section} of {source}: {exc}") from exc
        try:
            out.append(PoolConfig(template=template, backend=backend or None, **values))
        except BadRequestError as exc:
            raise ConfigError(f"{section} in {source}: {exc.message}") from exc
    return tuple(out)


def _flatten(doc: Mapping[str, Any], path: Path) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key in ("pools", "fleet"):
            continue
        if key in _TABLES and isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {path}; known: {', '.join(sorted(_FIELDS))}")
    return flat


def find_config_file(flag: Path | None, env: Mapping[str, str]) -> Path | None:
    if flag is not None:
        return flag
    if env.get("BRANCHBOX_CONFIG"):
        return Path(env["BRANCHBOX_CONFIG"])
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None


def load_config(
    config_file: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Merge defaults, the config file, the environment and flags (``None`` flags are 'not given')."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = find_config_file(config_file, env)
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        for name, value in _flatten(doc, path).items():
            values[name] = _convert(name, value, str(path))
        if "pools" in doc:
            values["pools"] = parse_pools(doc["pools"], str(path))
        if "fleet" in doc:
            if not isinstance(doc["fleet"], Mapping):
                raise ConfigError(f"fleet in {path} must be a table: [fleet] (docs/fleet.md)")
            values["fleet"] = dict(doc["fleet"])
    for name in _FIELDS:
        var = "BRANCHBOX_" + name.upper()
        if var in env:
            values[name] = _convert(name, env[var], f"${var}")
    for name, value in (flags or {}).items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown flag setting {name}")
        if value is not None:
            values[name] = _convert(name, value, f"--{name.replace('_', '-')}")
    cfg = DaemonConfig(**values)
    return _check(cfg)


def _check(cfg: DaemonConfig) -> DaemonConfig:
    if cfg.cgroup_parent is not None and not _CGROUP_NAME.match(cfg.cgroup_parent):
        raise ConfigError(
            f"cgroup_parent {cfg.cgroup_parent!r}: use 1-64 of A-Z, a-z, 0-9, '_', '-', '.' starting with a "
            "letter or digit (one cgroup directory name)"
        )
    if cfg.git_cache_budget_mb < 0 or cfg.git_ref_ttl < 0:
        raise ConfigError("git_cache_budget_mb and git_ref_ttl must be >= 0")
    if not 0 < cfg.default_timeout <= cfg.max_timeout <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"default_timeout {cfg.default_timeout:g} and max_timeout {cfg.max_timeout:g}: need "
            f"0 < default_timeout <= max_timeout <= {MAX_TIMEOUT_S:g} s (one year)"
        )
    if cfg.tmp_tmpfs_mb < 0:
        raise ConfigError(f"tmp_tmpfs_mb {cfg.tmp_tmpfs_mb}: use 0 (/tmp on the sandbox's disk) or a size in MiB")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"port {cfg.port} is out of range: use 1-65535")
    if cfg.event_loop not in ("asyncio", "uvloop", "auto"):
        raise ConfigError(f"event_loop {cfg.event_loop!r}: use asyncio, uvloop or auto")
    if cfg.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("event_loop is uvloop but uvloop is not installed: pip install uvloop, or use asyncio")
    if cfg.log_format not in ("json", "console"):
        raise ConfigError(f"log_format {cfg.log_format!r}: use json or console")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level {cfg.log_level!r}: use debug, info, warning or error")
    cfg.network_settings()  # raises ConfigError for a bad subnet, table or prefix
    api = cfg.api_settings("check")
    if api.auth_required and not api.api_key_hashes:
        raise ConfigError(
            f"host {cfg.host} is not loopback, so API keys are required but none are configured: run "
            "`branchbox key new` and put the hash in api_key_hashes or api_keys_file (or bind 127.0.0.1)"
        )
    return dataclasses.replace(cfg, log_level=cfg.log_level.lower())
