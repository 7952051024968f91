"""Shared fixtures: the default template (built once, cached across runs), Managers on fresh data dirs, real
``branchbox serve`` subprocesses (``DaemonProc``, ``daemon``, ``daemon_factory``), and a check that tests leave no
processes, cgroups or mounts behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import branchbox
from branchbox.core.settings import ManagerSettings, WorkspaceSettings
from branchbox.models import TemplateInfo
from branchbox.net.settings import NetworkSettings
from tests.leaks import _cgroup_dirs, _in_cgroup_tree
from tests.net_env import Internet, make_internet
from tests.rootfs_fixtures import busybox_rootfs, busybox_rootfs_tar  # noqa: F401 - session fixtures for all tests

GIT_SERVERS = ("127.0.0.0/8",)  # where the tests' git servers listen: allowed for workspace fetches
TEST_ROOT = Path(os.environ.get("BRANCHBOX_TEST_ROOT", "/var/tmp/branchbox-test"))


def templates_dir() -> Path:
    return Path(os.environ.get("BRANCHBOX_TEST_TEMPLATES") or TEST_ROOT / "templates")


def vm_cache() -> Path:
    """The microVM image cache, shared across runs: ``BRANCHBOX_VM_CACHE``, else ``$BRANCHBOX_DATA_DIR/vm``, else
    under the test root."""
    if os.environ.get("BRANCHBOX_VM_CACHE"):
        return Path(os.environ["BRANCHBOX_VM_CACHE"])
    if os.environ.get("BRANCHBOX_DATA_DIR"):
        return Path(os.environ["BRANCHBOX_DATA_DIR"]) / "vm"
    return TEST_ROOT / "vm-cache"


@pytest.fixture(scope="session")
def default_template() -> TemplateInfo:
    """The default template (Debian 12 minbase + python3, git, ...). Built once (~1 min), then a cache hit."""
    from branchbox.images.store import TemplateStore

    store = TemplateStore(templates_dir())
    return asyncio.run(store.ensure_default())


@pytest.fixture(scope="session")
def base_template(default_template: Any) -> Any:
    """The E2B-style ``base`` template (src/branchbox/templates/base.toml): built once (~1 min), then cached."""
    import asyncio
    from importlib import resources
    from pathlib import Path

    from branchbox.images.spec import load_spec
    from branchbox.images.store import TemplateStore

    spec = load_spec(Path(str(resources.files("branchbox.templates").joinpath("base.toml"))))
    return asyncio.run(TemplateStore(templates_dir()).build(spec))


@pytest.fixture
def internet() -> Iterator[Internet]:
    """The test's own "internet" (tests/net_env.py): public-looking web servers and DNS in a namespace."""
    inet = make_internet()
    try:
        yield inet
    finally:
        inet.stop()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh data dir reachable by the sandbox uid range (tmp_path is 0700 and would not be)."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(TEST_ROOT, 0o711)
    d = TEST_ROOT / f"data-{secrets.token_hex(4)}"
    d.mkdir(mode=0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_settings(data_dir: Path, **overrides: object) -> ManagerSettings:
    kw: dict[str, object] = {
        "data_dir": data_dir,
        "templates_dir": templates_dir(),
        "cgroup_parent": f"bbtest-{data_dir.name}",
        "keep_sandboxes_on_shutdown": False,
        "workspaces": WorkspaceSettings(allow_cidrs=GIT_SERVERS),  # the tests' git servers are on loopback
    }
    kw.update(overrides)
    return ManagerSettings(**kw)  # type: ignore[arg-type]


@pytest.fixture
async def manager(default_template: TemplateInfo, data_dir: Path) -> AsyncIterator[object]:
    from branchbox.core.manager import Manager

    settings = make_settings(data_dir)
    async with Manager.open(settings) as m:
        yield m
    leftover = list(Path("/sys/fs/cgroup").glob(f"*/{settings.cgroup_parent}"))
    assert not leftover, f"cgroups left behind after the Manager closed: {leftover}"


# ------------------------------------------------------------------ real daemons

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
    """A ``branchbox serve`` subprocess on a free loopback port with its own data dir and cgroup parent.

    Its subnet, nftables table and veth prefix are the daemon's own choice (a claimed, allocated subnet; names
    derived from the cgroup parent), read back from ``DATA/host.json`` after start (``names``, ``network``).
    ``derived=True`` leaves the cgroup parent to the daemon too (derived from the data dir), as a user's
    ``branchbox serve`` without configuration has it."""

    def __init__(
        self,
        data_dir: Path,
        *,
        keep: bool = False,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        config: str | None = None,
        derived: bool = False,
    ) -> None:
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.derived = derived
        self.cgroup_parent = "" if derived else f"bbtest-{data_dir.name}"  # derived: known after start
        self.names: dict[str, str] = {}
        self.log_path = data_dir / "daemon.log"
        self.keep = keep
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        # networking on (the daemon's default) in a subnet it allocates; DNS goes nowhere (port 9, discard)
        self.network: NetworkSettings | None = None  # what the daemon resolved (after start)
        self.network_env = {"BRANCHBOX_NETWORK_DNS_UPSTREAM": "127.0.0.1:9",
                            "BRANCHBOX_GIT_ALLOW_CIDRS": ",".join(GIT_SERVERS)}  # fmt: skip
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = data_dir / "config.toml"
            self.config_path.write_text(config)

    def start(self, timeout: float = 60.0) -> None:
        names = {} if self.derived else {"BRANCHBOX_CGROUP_PARENT": self.cgroup_parent}
        env = cli_env(
            **names,
            BRANCHBOX_KEEP_SANDBOXES_ON_SHUTDOWN="true" if self.keep else "false",
            BRANCHBOX_LOG_LEVEL="debug",
            **{**self.network_env, **self.extra_env},
        )
        argv = [
            sys.executable, "-m", "branchbox.cli", "serve", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--templates-dir", str(templates_dir()),
        ]  # fmt: skip
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:  # readiness: the only wait that must poll (a separate process, no event to wait on)
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    self._read_names()
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not healthy after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def _read_names(self) -> None:
        """The names the daemon claimed (DATA/host.json, written before it listens)."""
        self.names = json.loads((self.data_dir / "host.json").read_text())
        self.cgroup_parent = self.names["cgroup_parent"]
        if self.names.get("subnet"):
            self.network = NetworkSettings(
                subnet=self.names["subnet"], table=self.names["table"], if_prefix=self.names["if_prefix"]
            )

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
        assert self.cgroup_parent, "start the daemon first (its cgroup parent is derived)"
        cgroups = sorted(_cgroup_dirs(self.cgroup_parent, spares=True))
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
            if self.proc is not None:
                self.stop()
            self._drop_network()
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _drop_network(self) -> None:
        """What a daemon killed without its shutdown (SIGKILL, a failed restart) left of its network: its nftables
        table and veths, by the names it claimed in host.json (the daemon is stopped: nobody else has them)."""
        try:
            names = json.loads((self.data_dir / "host.json").read_text())
        except (OSError, ValueError):
            return
        table, prefix = names.get("table"), names.get("if_prefix")
        if table:
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
        if prefix:
            for link in os.listdir("/sys/class/net"):
                if link.startswith(f"{prefix}-"):
                    subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


@pytest.fixture
def daemon_factory(default_template: Any) -> Iterator[Any]:
    """Start daemons with ``daemon_factory(keep=..., env=..., config=TOML, derived=...)``; all are cleaned up at the
    end."""
    made: list[DaemonProc] = []

    def make(
        *,
        keep: bool = False,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        config: str | None = None,
        start: bool = True,
        derived: bool = False,
    ) -> DaemonProc:
        d = DaemonProc(new_data_dir(), keep=keep, env=env, api_key=api_key, config=config, derived=derived)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        print(f"--- the log of the daemon on {d.data_dir} (pytest shows it when the test failed) ---\n{d.log()}")
        d.cleanup()


@pytest.fixture
def daemon(daemon_factory: Any) -> DaemonProc:
    d: DaemonProc = daemon_factory()
    return d
