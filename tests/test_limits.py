"""One set of limits (limits.py): the API's schema bounds are core's, they show in the OpenAPI document,
requests above a size bound get 413 payload_too_large (400 for a value out of range) and change nothing, and the
bounds are true (a command at Linux's argument limit runs). One place for the daemon's defaults and the version."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

import branchbox
from branchbox import limits as L
from branchbox.api.schemas import CreateSandboxRequest, PoolSettings, RunCommandRequest
from branchbox.api.settings import ApiSettings
from branchbox.core import validate
from branchbox.core.settings import ManagerSettings, WorkspaceSettings
from branchbox.daemon.config import ConfigError, DaemonConfig, load_config
from branchbox.errors import BadRequestError, PayloadTooLargeError
from branchbox.net.settings import NetworkSettings
from branchbox.sdk import BadRequestError as SdkBadRequest
from branchbox.sdk import Sandbox
from tests.conftest import DaemonProc

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ pure: one source


def _props(model: Any) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {k: _one(v, schema) for k, v in schema["properties"].items()}


def _one(prop: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A property's own bounds (the non-null branch of ``X | None``)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null" and "$ref" not in branch:
            return {**prop, **branch}
    return prop


def test_schema_bounds_are_cores() -> None:
    for model in (CreateSandboxRequest, PoolSettings):
        p = _props(model)
        assert (p["memory_mb"]["minimum"], p["memory_mb"]["maximum"]) == (L.MIN_MEMORY_MB, L.MAX_MEMORY_MB)
        assert (p["pids"]["minimum"], p["pids"]["maximum"]) == (L.MIN_PIDS, L.MAX_PIDS)
        assert (p["cpu"]["minimum"], p["cpu"]["maximum"]) == (L.MIN_CPU, L.MAX_CPU)
        assert (p["cpu"]["default"], p["memory_mb"]["default"], p["pids"]["default"]) == (
            L.DEFAULT_CPU,
            L.DEFAULT_MEMORY_MB,
            L.DEFAULT_PIDS,
        )
    p = _props(CreateSandboxRequest)
    assert p["timeout"]["maximum"] == L.MAX_TIMEOUT_S
    assert p["envs"]["maxProperties"] == L.MAX_ENV_VARS
    assert p["metadata"]["maxProperties"] == L.MAX_METADATA
    assert p["metadata"]["additionalProperties"]["maxLength"] == L.MAX_METADATA_VALUE
    r = _props(RunCommandRequest)
    string_cmd, list_cmd = r["cmd"]["anyOf"]
    assert string_cmd["maxLength"] == L.MAX_ARG_BYTES
    assert list_cmd["maxItems"] == L.MAX_ARGV
    assert list_cmd["items"]["maxLength"] == L.MAX_ARG_BYTES
    assert r["stdin"]["maxLength"] == L.MAX_STDIN_BYTES
    assert r["cwd"]["maxLength"] == L.MAX_PATH_BYTES - 1


def test_openapi_document_shows_the_bounds() -> None:
    doc = json.loads((ROOT / "docs" / "openapi.json").read_text())
    create = doc["components"]["schemas"]["CreateSandboxRequest"]["properties"]
    assert create["memory_mb"]["minimum"] == L.MIN_MEMORY_MB
    assert create["pids"]["maximum"] == L.MAX_PIDS
    run = doc["components"]["schemas"]["RunCommandRequest"]["properties"]
    assert run["cmd"]["anyOf"][0]["maxLength"] == L.MAX_ARG_BYTES
    assert any(b.get("maxLength") == L.MAX_STDIN_BYTES for b in run["stdin"]["anyOf"])
    assert "413" in doc["paths"]["/v1/sandboxes/{sandbox_id}/commands"]["post"]["responses"]


def test_core_checks_bytes_the_schema_counts_characters() -> None:
    validate.command("x" * L.MAX_ARG_BYTES)
    with pytest.raises(PayloadTooLargeError, match="Linux's limit"):
        validate.command("é" * (L.MAX_ARG_BYTES // 2 + 1))  # within the schema's characters, above in bytes
    with pytest.raises(PayloadTooLargeError):
        validate.command(["x" * 100_000] * 11)  # each argument fits, the whole command does not
    with pytest.raises(PayloadTooLargeError):
        validate.command(["true"] * (L.MAX_ARGV + 1))
    with pytest.raises(BadRequestError):
        validate.command(["a\0b"])
    with pytest.raises(PayloadTooLargeError):
        validate.stdin(b"x" * (L.MAX_STDIN_BYTES + 1))
    with pytest.raises(PayloadTooLargeError):
        validate.env({"A": "x" * L.MAX_ARG_BYTES})
    with pytest.raises(PayloadTooLargeError):
        validate.metadata({f"k{i}": "v" for i in range(L.MAX_METADATA + 1)})
    assert issubclass(PayloadTooLargeError, BadRequestError)
    assert (PayloadTooLargeError.code, PayloadTooLargeError.http_status) == ("payload_too_large", 413)


def test_daemon_defaults_are_the_cores() -> None:
    cfg, core, ws, net = DaemonConfig(), ManagerSettings(), WorkspaceSettings(), NetworkSettings()
    for name in ("default_timeout", "max_timeout", "max_sandboxes", "default_backend"):
        assert getattr(cfg, name) == getattr(core, name), name
    assert cfg.keep_sandboxes_on_shutdown == core.keep_sandboxes_on_shutdown
    assert cfg.tmp_tmpfs_mb == core.tmp_tmpfs_mb
    assert (cfg.git_cache_budget_mb, cfg.git_ref_ttl) == (ws.cache_budget_mb, ws.ref_ttl)
    assert cfg.network_dns_port == net.dns_port
    # cgroup_parent and network_subnet are host-unique names the daemon claims (None here: daemon/claims.py)


def test_config_refuses_a_max_timeout_above_the_ceiling(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[manager]\nmax_timeout = {L.MAX_TIMEOUT_S * 2}\n")
    with pytest.raises(ConfigError, match="max_timeout"):
        load_config(f, env={})
    f.write_text("[manager]\ndefault_timeout = 600\nmax_timeout = 60\n")
    with pytest.raises(ConfigError, match="default_timeout"):
        load_config(f, env={})


def test_version_is_written_once() -> None:
    from branchbox._version import VERSION

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "branchbox._version.VERSION"}
    assert branchbox.__version__ == VERSION == ApiSettings().version


# ------------------------------------------------------------------ through the SDK, against a real daemon


def _refused(call: Any, *, status: int, code: str | None) -> None:
    with pytest.raises(SdkBadRequest) as info:
        call()
    assert info.value.status == status, info.value
    if code is not None:
        assert info.value.code == code, info.value


def test_requests_above_the_bounds_are_refused_and_change_nothing(daemon: DaemonProc) -> None:
    url = daemon.url
    with Sandbox.create(base_url=url) as sbx:
        run = sbx.commands.run
        too_large = {"status": 413, "code": "payload_too_large"}
        _refused(lambda: run("x" * (L.MAX_ARG_BYTES + 1)), **too_large)  # the schema (characters)
        _refused(lambda: run("é" * (L.MAX_ARG_BYTES // 2 + 1)), **too_large)  # core (bytes)
        _refused(lambda: run(["true"] * (L.MAX_ARGV + 1)), **too_large)
        _refused(lambda: run(["echo", *(["x" * 100_000] * 11)]), **too_large)  # 1.1 MB in all
        _refused(lambda: run("true", envs={"A": "x" * (L.MAX_ARG_BYTES + 1)}), **too_large)
        _refused(lambda: run("cat", stdin="x" * (L.MAX_STDIN_BYTES + 1)), status=413, code=None)
        _refused(lambda: run("pwd", cwd="/" + "d" * L.MAX_PATH_BYTES), **too_large)
        _refused(lambda: sbx.files.read("/" + "f" * L.MAX_PATH_BYTES), **too_large)
        _refused(lambda: run("true", envs={"1BAD": "x"}), status=400, code="bad_request")
        before = {s.sandbox_id for s in Sandbox.list(base_url=url)}
        _refused(lambda: Sandbox.create(memory_mb=L.MIN_MEMORY_MB - 1, base_url=url), status=400, code="bad_request")
        _refused(lambda: Sandbox.create(pids=L.MAX_PIDS + 1, base_url=url), status=400, code="bad_request")
        meta = {f"k{i}": "v" for i in range(L.MAX_METADATA + 1)}
        _refused(lambda: Sandbox.create(metadata=meta, base_url=url), **too_large)
        assert {s.sandbox_id for s in Sandbox.list(base_url=url)} == before
        # the bounds are true: a command at Linux's limit for one argument runs (one byte more was refused above)
        at_limit = "true #" + "x" * (L.MAX_ARG_BYTES - 6)
        assert len(at_limit.encode()) == L.MAX_ARG_BYTES
        assert run(at_limit).exit_code == 0
        assert run(["sh", "-c", 'echo "${#1}"', "sh", "y" * L.MAX_ARG_BYTES]).stdout == f"{L.MAX_ARG_BYTES}\n"
        assert run("echo ok").stdout == "ok\n"  # the sandbox is untouched
