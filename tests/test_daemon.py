"""The daemon: config precedence, API keys, and a real ``branchbox serve`` subprocess (graceful SIGTERM, kill -9
then restart with every sandbox still usable). ``DaemonProc`` and the ``daemon`` fixture are shared with
test_sdk, test_cli and test_openapi."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import branchbox
from branchbox.api.auth import ApiKeyChecker, generate_api_key, hash_api_key
from branchbox.api.settings import ApiSettings
from branchbox.daemon.config import ConfigError, DaemonConfig, load_config
from branchbox.errors import UnauthorizedError
from tests.conftest import TEST_ROOT, templates_dir
from tests.leaks import _cgroup_dirs, _in_cgroup_tree

SRC = str(Path(branchbox.__file__).resolve().parent.parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_data_dir() -> Path:
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(TEST_ROOT, 0o711)
    d = TEST_ROOT / f"data-{secrets.token_hex(4)}"
    d.mkdir(mode=0o711)
    return d


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a branchbox subprocess: this checkout on PYTHONPATH, no inherited BRANCHBOX_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHBOX_")}
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class DaemonProc:
    """A ``branchbox serve`` subprocess on a free loopback port with its own data dir and cgroup parent."""

    def __init__(
        self,
        data_dir: Path,
        *,
        keep: bool = False,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cgroup_parent = f"bbtest-{data_dir.name}"
        self.log_path = data_dir / "daemon.log"
        self.keep = keep
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = cli_env(
            BRANCHBOX_CGROUP_PARENT=self.cgroup_parent,
            BRANCHBOX_KEEP_SANDBOXES_ON_SHUTDOWN="true" if self.keep else "false",
            BRANCHBOX_LOG_LEVEL="debug",
            **self.extra_env,
        )
        argv = [
            sys.executable, "-m", "branchbox.cli", "serve", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--templates-dir", str(templates_dir()),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:  # readiness: the only wait that must poll (a separate process, no event to wait on)
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not healthy after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-8000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def destroy_all(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            resp = httpx.get(self.url + "/v1/sandboxes", headers=self.headers, timeout=30)
            resp.raise_for_status()
            for sbx in resp.json():
                httpx.delete(f"{self.url}/v1/sandboxes/{sbx['sandbox_id']}", headers=self.headers, timeout=60)

    def leftovers(self) -> list[str]:
        """Cgroups and processes of this daemon's sandboxes still on the host."""
        cgroups = sorted(_cgroup_dirs(self.cgroup_parent))
        procs = [str(p) for p in os.listdir("/proc") if p.isdigit() and _in_cgroup_tree(int(p), self.cgroup_parent)]
        return cgroups + procs

    def cleanup(self) -> None:
        """Destroy every sandbox (restarting the daemon if it died) and stop it; then remove the data dir."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                self.keep = False
                with contextlib.suppress(RuntimeError):
                    self.start()
            self.destroy_all()
        finally:
            self.stop()
            shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def daemon_factory(default_template: Any) -> Iterator[Any]:
    """Start daemons with ``daemon_factory(keep=..., env=...)``; all are destroyed and stopped at the end."""
    made: list[DaemonProc] = []

    def make(
        *,
        keep: bool = False,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        start: bool = True,
    ) -> DaemonProc:
        d = DaemonProc(new_data_dir(), keep=keep, env=env, api_key=api_key)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def daemon(daemon_factory: Any) -> DaemonProc:
    d: DaemonProc = daemon_factory()
    return d


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
