"""The daemon: config precedence, API keys, and a real ``branchbox serve`` subprocess (graceful SIGTERM, kill -9
then restart with every sandbox still usable). ``DaemonProc`` and the ``daemon`` fixtures live in conftest."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

import branchbox
from branchbox.api.auth import ApiKeyChecker, generate_api_key, hash_api_key
from branchbox.api.settings import ApiSettings
from branchbox.daemon.config import ConfigError, DaemonConfig, load_config
from branchbox.errors import UnauthorizedError
from tests.conftest import DaemonProc

# ------------------------------------------------------------------ config (pure)


def test_config_precedence_flags_over_env_over_file_over_default(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('port = 1111\nhost = "127.0.0.1"\n[manager]\ndefault_timeout = 10\nmax_sandboxes = 7\n')
    env = {"BRANCHBOX_PORT": "2222", "BRANCHBOX_DEFAULT_TIMEOUT": "20"}
    cfg = load_config(cfg_file, env=env, flags={"port": 3333, "host": None})
    assert cfg.port == 3333  # flag
    assert cfg.default_timeout == 20.0  # env beats file
    assert cfg.max_sandboxes == 7  # file beats default
    assert cfg.max_timeout == DaemonConfig().max_timeout  # default
    assert cfg.host == "127.0.0.1"  # a None flag is "not given"


def test_config_file_from_env_and_errors_name_the_source(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("keep_sandboxes_on_shutdown = false\n")
    assert load_config(env={"BRANCHBOX_CONFIG": str(cfg_file)}).keep_sandboxes_on_shutdown is False
    with pytest.raises(ConfigError, match=r"BRANCHBOX_PORT"):
        load_config(env={"BRANCHBOX_PORT": "many"})
    cfg_file.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(cfg_file, env={})
    cfg_file.write_text("port = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(cfg_file, env={})


def test_non_loopback_bind_requires_keys_and_keys_are_hashes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="API keys are required"):
        load_config(env={}, flags={"host": "0.0.0.0"})
    key = generate_api_key()
    with pytest.raises(ConfigError, match="sha256"):
        load_config(env={"BRANCHBOX_API_KEY_HASHES": key}, flags={"host": "0.0.0.0"})
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# ops team\n{hash_api_key(key)}  # added today\n\n")
    cfg = load_config(env={}, flags={"host": "0.0.0.0", "api_keys_file": keys_file})
    api = cfg.api_settings("x")
    assert api.auth_required
    assert api.api_key_hashes == (hash_api_key(key),)
    keys_file.write_text(key + "\n")
    with pytest.raises(ConfigError, match="not a sha256"):
        cfg.api_settings("x")


def test_key_checker_constant_time_and_rules() -> None:
    key = generate_api_key()
    required = ApiKeyChecker([hash_api_key(key), hash_api_key("other")], required=True)
    required.check(f"Bearer {key}")
    for bad in (None, "", f"Basic {key}", "Bearer ", "Bearer wrong"):
        with pytest.raises(UnauthorizedError):
            required.check(bad)
    optional = ApiKeyChecker([hash_api_key(key)], required=False)
    optional.check(None)
    with pytest.raises(UnauthorizedError):
        optional.check("Bearer wrong")  # optional, but a key that is sent must be valid
    ApiKeyChecker([], required=False).check("Bearer anything")  # nothing configured to check against
    assert ApiSettings(host="::1").auth_required is False
    assert ApiSettings(host="10.0.0.1").auth_required is True
    with pytest.raises(ValueError, match="sha256"):
        ApiKeyChecker(["not-a-hash"], required=True)


# ------------------------------------------------------------------ the real daemon


@pytest.mark.root
def test_health_version_and_sigterm_keeps_sandboxes_for_the_next_start(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(keep=True)
    assert httpx.get(d.url + "/health").json() == {"status": "ok"}
    assert httpx.get(d.url + "/version").json()["version"] == branchbox.__version__
    sid = httpx.post(d.url + "/v1/sandboxes", json={"metadata": {"k": "v"}}, timeout=60).json()["sandbox_id"]
    httpx.put(f"{d.url}/v1/sandboxes/{sid}/files", params={"path": "/work/keep"}, content=b"kept", timeout=30)
    assert d.stop(signal.SIGTERM) == 0
    assert "daemon.stopped" in d.log()
    d.start()
    info = httpx.get(f"{d.url}/v1/sandboxes/{sid}", timeout=30).json()
    assert info["state"] == "running"
    body = httpx.get(f"{d.url}/v1/sandboxes/{sid}/files", params={"path": "/work/keep"}, timeout=30)
    assert body.content == b"kept"


@pytest.mark.root
def test_sigterm_with_stop_policy_destroys_sandboxes(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(keep=False)
    for _ in range(2):
        assert httpx.post(d.url + "/v1/sandboxes", json={}, timeout=60).status_code == 201
    assert d.stop(signal.SIGTERM) == 0
    assert d.leftovers() == []


@pytest.mark.root
def test_kill9_then_restart_every_sandbox_still_usable_nothing_leaked(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(keep=True)
    ids = []
    for i in range(3):
        r = httpx.post(d.url + "/v1/sandboxes", json={"metadata": {"n": str(i)}}, timeout=60)
        assert r.status_code == 201, r.text
        ids.append(r.json()["sandbox_id"])
        httpx.put(f"{d.url}/v1/sandboxes/{ids[-1]}/files", params={"path": "/work/n"}, content=str(i).encode())
    bg = httpx.post(
        f"{d.url}/v1/sandboxes/{ids[0]}/commands", json={"cmd": "sleep 1000", "background": True}, timeout=30
    ).json()["pid"]
    d.stop(signal.SIGKILL)
    d.start()
    listed = {s["sandbox_id"]: s for s in httpx.get(d.url + "/v1/sandboxes", timeout=30).json()}
    assert set(listed) == set(ids)
    for i, sid in enumerate(ids):
        assert listed[sid]["state"] == "running"
        assert listed[sid]["metadata"] == {"n": str(i)}
        r = httpx.post(f"{d.url}/v1/sandboxes/{sid}/commands", json={"cmd": "cat /work/n; echo ok"}, timeout=60)
        assert r.json()["stdout"] == f"{i}ok\n", d.log()
    procs = httpx.get(f"{d.url}/v1/sandboxes/{ids[0]}/commands", timeout=30).json()
    assert any(p["pid"] == bg and p["running"] for p in procs)
    d.destroy_all()
    assert httpx.get(d.url + "/v1/sandboxes", timeout=30).json() == []
    assert d.stop() == 0
    assert d.leftovers() == []


def test_event_loop_setting_is_checked() -> None:
    from branchbox.daemon.http_front import FrontProtocol
    from branchbox.daemon.serve import http_impl, loop_factory

    assert load_config(env={}).event_loop == "auto"
    assert load_config(env={"BRANCHBOX_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(ConfigError, match="event_loop 'trio'"):
        load_config(env={"BRANCHBOX_EVENT_LOOP": "trio"})
    assert loop_factory("asyncio") is None
    assert http_impl() is FrontProtocol  # httptools is a dependency: the fast C parser is what the daemon runs
