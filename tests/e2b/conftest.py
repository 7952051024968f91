"""A real daemon with an API key, and the e2b SDK pointed at it by its three environment variables."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from branchbox.api.auth import generate_api_key, hash_api_key
from e2b import Sandbox
from tests.conftest import DaemonProc


class E2BDaemon:
    def __init__(self, daemon: DaemonProc, key: str) -> None:
        self.daemon = daemon
        self.key = key
        self.url = daemon.url


@pytest.fixture(scope="session")
def e2b_daemon(default_template: Any) -> Iterator[E2BDaemon]:
    """One daemon per test session (per xdist worker): tests kill what they create."""
    from tests.conftest import new_data_dir

    key = generate_api_key()
    d = DaemonProc(
        new_data_dir(), env={"BRANCHBOX_REQUIRE_AUTH": "true", "BRANCHBOX_API_KEY_HASHES": hash_api_key(key)}
    )
    d.headers = {"authorization": f"Bearer {key}"}
    try:
        d.start()
        yield E2BDaemon(d, key)
    finally:
        print(f"--- the log of the daemon on {d.data_dir} ---\n{d.log()}")
        d.cleanup()


@pytest.fixture
def sbx(e2b_env: E2BDaemon) -> Iterator[Sandbox]:
    """A sandbox of the default template (root, like the native API's), killed at the end."""
    s = Sandbox.create("default", timeout=300)
    yield s
    Sandbox.kill(s.sandbox_id)


@pytest.fixture
def restartable_daemon(daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> DaemonProc:
    """A daemon of the test's own that keeps its sandboxes when stopped (``stop()`` then ``start()``), with an API
    key, and the e2b SDK pointed at it."""
    key = generate_api_key()
    d: DaemonProc = daemon_factory(
        keep=True, env={"BRANCHBOX_REQUIRE_AUTH": "true", "BRANCHBOX_API_KEY_HASHES": hash_api_key(key)}
    )
    d.headers = {"authorization": f"Bearer {key}"}
    for name in ("E2B_API_URL", "E2B_SANDBOX_URL"):
        monkeypatch.setenv(name, d.url)
    monkeypatch.setenv("E2B_API_KEY", key)
    return d


@pytest.fixture
def e2b_env(e2b_daemon: E2BDaemon, monkeypatch: pytest.MonkeyPatch) -> E2BDaemon:
    monkeypatch.setenv("E2B_API_URL", e2b_daemon.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", e2b_daemon.url)
    monkeypatch.setenv("E2B_API_KEY", e2b_daemon.key)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    return e2b_daemon
