"""Warm pools over the daemon's config file, HTTP, the SDK, metrics and the CLI, against a real ``branchbox serve``
subprocess."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from branchbox.core.pool import PoolConfig
from branchbox.daemon.config import ConfigError, load_config
from branchbox.sdk import AsyncSandbox, NotFoundError, PoolInfo, Sandbox, TemplateNotFoundError
from branchbox.sdk import BadRequestError as SdkBadRequest
from branchbox.sdk import NotSupportedError as SdkNotSupported
from tests.conftest import DaemonProc, cli_env

POOL_TOML = """
[pools.default]
min_size = 2
target_free = 2
max_size = 4
memory_mb = 128
max_parallel_boots = 2
"""


def wait_pool(d: DaemonProc, template: str, ready: int, timeout: float = 120.0) -> dict[str, Any]:
    """Poll GET /v1/pools/{template} until ``ready`` members are ready (a separate process: nothing to await)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{d.url}/v1/pools/{template}", headers=d.headers, timeout=30)
        if r.status_code == 200 and r.json()["ready"] >= ready:
            body: dict[str, Any] = r.json()
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"pool {template} not {ready} ready: {r.text}\n{d.log()}")
        time.sleep(0.05)


# ------------------------------------------------------------------ config (pure)


def test_pool_sections_become_pool_configs(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(POOL_TOML + "[pools.other]\nreuse = true\ncpu = 2\nmax_memory_mb = 1024\n")
    cfg = load_config(f, env={})
    assert cfg.pools == (
        PoolConfig(template="default", min_size=2, target_free=2, max_size=4, memory_mb=128, max_parallel_boots=2),
        PoolConfig(template="other", reuse=True, cpu=2.0, max_memory_mb=1024),
    )
    assert cfg.manager_settings().pools == cfg.pools
    assert load_config(env={}).pools == ()


def test_a_pool_on_another_backend_is_template_at_backend(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(POOL_TOML + '[pools."default@microvm"]\nmin_size = 1\nmemory_mb = 256\n')
    assert load_config(f, env={}).pools[1] == PoolConfig(template="default", backend="microvm", min_size=1,
                                                          memory_mb=256)  # fmt: skip
    f.write_text('[pools."default@no such"]\nmin_size = 1\n')
    with pytest.raises(ConfigError, match=r"\[pools\.\"default@no such\"\].*backend must be a backend's name"):
        load_config(f, env={})
    f.write_text('[pools.default]\nbackend = "microvm"\n')  # the section names it, not a key
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) backend in \[pools\.default\]"):
        load_config(f, env={})


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("[pools.default]\nmin_size = 5\nmax_size = 2\n", r"\[pools\.default\].*min_size 5 > max_size 2"),
        ("[pools.default]\nmin_sise = 1\n", r"unknown setting\(s\) min_sise in \[pools\.default\]"),
        ('[pools.default]\nmin_size = "2"\n', r"invalid min_size='2' in \[pools\.default\]"),
        ("[pools.default]\nreuse = 1\n", r"invalid reuse=1 in \[pools\.default\]"),
        ("[pools.default]\nmax_size = -1\n", r"\[pools\.default\].*max_size must be a whole number"),
        ("[pools.default]\ncpu = 0\n", r"invalid cpu=0 in \[pools\.default\]"),
        ("[pools]\ndefault = 3\n", r"\[pools\.default\] .* must be a table"),
    ],
)
def test_bad_pool_config_names_section_and_field(tmp_path: Path, body: str, match: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(f, env={})
    assert str(f) in info.value.message
    assert info.value.code == "bad_request"


def test_serve_with_bad_pool_config_exits_2_with_the_message(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[pools.default]\ntarget_free = 9\nmax_size = 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "branchbox.cli", "serve", "--config", str(f), "--data-dir", str(tmp_path / "d")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "[pools.default]" in r.stderr
    assert "target_free 9 > max_size 3" in r.stderr


# ------------------------------------------------------------------ the real daemon


@pytest.mark.root
def test_pool_from_config_fills_and_serves_warm_creates(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(config=POOL_TOML)
    stats = wait_pool(d, "default", 2)
    assert stats["config"]["memory_mb"] == 128
    assert stats["target"] == 2
    listed = httpx.get(d.url + "/v1/pools", timeout=30).json()
    assert [p["template"] for p in listed] == ["default"]

    warm = Sandbox.create(memory_mb=128, base_url=d.url)
    try:
        assert warm.info.source == "warm"
        assert "claim" in warm.info.timings
        assert "total" in warm.info.timings
        assert warm.commands.run("echo hi").stdout == "hi\n"
        cold = Sandbox.create(memory_mb=256, base_url=d.url)  # other resources: never from the pool
        try:
            assert cold.info.source == "cold"
        finally:
            cold.kill()
            cold.close()
        stats = Sandbox.get_pool("default", base_url=d.url)
        assert stats.hits == 1
        assert stats.claimed == 1
    finally:
        warm.kill()
        warm.close()
    metrics = httpx.get(d.url + "/metrics", timeout=30).text
    assert 'branchbox_pool_hits_total{backend="container",template="default"} 1.0' in metrics
    assert 'branchbox_pool_ready{backend="container",template="default"}' in metrics
    assert 'branchbox_create_duration_seconds_count{backend="container",outcome="ok",source="warm"} 1.0' in metrics


@pytest.mark.root
def test_put_changes_a_pool_live_and_delete_removes_it(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(config=POOL_TOML)
    wait_pool(d, "default", 2)
    r = httpx.put(d.url + "/v1/pools/default", json={"min_size": 3, "max_size": 4, "memory_mb": 128}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["config"]["min_size"] == 3
    assert r.json()["config"]["target_free"] == 2  # left out: the default
    assert wait_pool(d, "default", 3)["target"] == 3

    # bad settings: 400 with a code, the pool unchanged
    for body in ({"min_size": 5, "max_size": 2}, {"min_sise": 1}, {"max_size": -1}, {"max_parallel_boots": 0}):
        r = httpx.put(d.url + "/v1/pools/default", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["code"] == "bad_request"
    assert httpx.get(d.url + "/v1/pools/default", timeout=30).json()["config"]["min_size"] == 3
    r = httpx.put(d.url + "/v1/pools/missing-template", json={}, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "template_not_found"

    # other resources: every old member goes, new ones boot with the new resources
    r = httpx.put(d.url + "/v1/pools/default", json={"min_size": 1, "max_size": 2, "memory_mb": 96}, timeout=60)
    assert r.status_code == 200, r.text
    wait_pool(d, "default", 1)
    sbx = Sandbox.create(memory_mb=96, base_url=d.url)
    try:
        assert sbx.info.source == "warm"
        assert sbx.info.memory_mb == 96
    finally:
        sbx.kill()
        sbx.close()

    assert httpx.delete(d.url + "/v1/pools/default", timeout=60).status_code == 204
    r = httpx.get(d.url + "/v1/pools/default", timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert httpx.delete(d.url + "/v1/pools/default", timeout=30).status_code == 404
    assert httpx.get(d.url + "/v1/pools", timeout=30).json() == []
    # the removed pool's ready members were destroyed: nothing but what the user made is listed
    assert httpx.get(d.url + "/v1/sandboxes", timeout=30).json() == []


@pytest.mark.root
async def test_sdk_pool_helpers_sync_and_async(daemon: DaemonProc) -> None:
    assert Sandbox.pools(base_url=daemon.url) == []
    info = Sandbox.configure_pool("default", min_size=1, max_size=2, memory_mb=112, base_url=daemon.url)
    assert isinstance(info, PoolInfo)
    assert (info.template, info.settings.min_size, info.settings.memory_mb, info.target) == ("default", 1, 112, 2)
    with pytest.raises(SdkBadRequest):
        Sandbox.configure_pool("default", min_size=3, max_size=1, base_url=daemon.url)
    with pytest.raises(TemplateNotFoundError):
        Sandbox.configure_pool("nope", base_url=daemon.url)
    pools = await AsyncSandbox.pools(base_url=daemon.url)
    assert [(p.template, p.backend) for p in pools] == [("default", "container")]
    with pytest.raises(NotFoundError, match="on backend 'microvm'"):  # each backend has pools of its own
        Sandbox.get_pool("default", backend="microvm", base_url=daemon.url)
    assert Sandbox.get_pool("default", backend="container", base_url=daemon.url).settings.memory_mb == 112
    with pytest.raises(SdkNotSupported):
        Sandbox.configure_pool("default", backend="nope", base_url=daemon.url)
    info = await AsyncSandbox.configure_pool("default", min_size=0, target_free=1, max_size=1, base_url=daemon.url)
    assert info.settings.target_free == 1
    assert (await AsyncSandbox.get_pool("default", base_url=daemon.url)).settings.max_size == 1
    await AsyncSandbox.remove_pool("default", base_url=daemon.url)
    with pytest.raises(NotFoundError):
        Sandbox.get_pool("default", base_url=daemon.url)
    with pytest.raises(NotFoundError):
        Sandbox.remove_pool("default", base_url=daemon.url)


@pytest.mark.root
def test_cli_pools_table_set_and_rm(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(config=POOL_TOML)
    wait_pool(d, "default", 2)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "branchbox.cli", "--url", d.url, *args],
            env=cli_env(COLUMNS="200"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    r = cli("pools")
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert header == ["TEMPLATE", "BACKEND", "READY", "BOOTING", "CLAIMED", "HITS", "MISSES", "P50", "CLAIM", "MS",
                      "TARGET", "MAX"]  # fmt: skip
    row = r.stdout.splitlines()[1].split()
    assert row[:2] == ["default", "container"]
    assert row[-2:] == ["2", "4"]  # target, max
    r = cli("pools", "set", "default", "--target-free", "3")
    assert r.returncode == 0, r.stderr
    pool = Sandbox.get_pool("default", base_url=d.url)
    # the other settings were kept, not reset to defaults
    assert (pool.settings.target_free, pool.settings.min_size, pool.settings.memory_mb) == (3, 2, 128)
    r = cli("pools", "set", "default", "--min-size", "9")
    assert r.returncode == 1
    assert "bad_request" in r.stderr
    assert "min_size 9 > max_size 4" in r.stderr
    r = cli("pools", "rm", "default")
    assert r.returncode == 0, r.stderr
    assert Sandbox.pools(base_url=d.url) == []
    r = cli("pools")
    assert "no warm pools" in r.stdout
    r = cli("pools", "set", "default", "--max-size", "1", "--target-free", "0")  # a new pool from defaults
    assert r.returncode == 0, r.stderr
    assert Sandbox.get_pool("default", base_url=d.url).settings.max_size == 1
    r = cli("pools", "set", "default", "--backend", "nope", "--max-size", "1", "--target-free", "0")
    assert (r.returncode, "not_supported" in r.stderr) == (1, True), r.stderr
    r = cli("pools", "rm", "default", "--backend", "microvm")  # the container pool is not that one
    assert (r.returncode, "not_found" in r.stderr) == (1, True), r.stderr
    assert [p.backend for p in Sandbox.pools(base_url=d.url)] == ["container"]


@pytest.mark.root
def test_unknown_pool_template_in_config_stops_the_daemon_with_a_clear_error(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(config="[pools.no-such-template]\nmin_size = 1\n", start=False)
    with pytest.raises(RuntimeError, match="daemon exited with 2") as info:
        d.start()
    assert "no-such-template" in str(info.value)
    assert "template_not_found" in str(info.value)
