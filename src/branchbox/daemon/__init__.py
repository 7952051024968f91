"""The branchbox daemon: config (TOML + env + flags), structured logs, ``serve``."""

from branchbox.daemon.config import ConfigError, DaemonConfig, load_config

__all__ = ["ConfigError", "DaemonConfig", "load_config"]
