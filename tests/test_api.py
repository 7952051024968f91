"""The HTTP app in-process (httpx ASGITransport) over a real Manager: error shape, auth, metrics, routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from branchbox.api import ApiSettings, create_app
from branchbox.api.auth import generate_api_key, hash_api_key
from branchbox.api.routes_sandboxes import parse_metadata_filter
from branchbox.errors import BadRequestError


def test_metadata_filter_accepts_repeated_and_e2b_forms() -> None:
    assert parse_metadata_filter(["a=1", "b=2"]) == {"a": "1", "b": "2"}
    assert parse_metadata_filter(["a=1&b=x%3Dy"]) == {"a": "1", "b": "x=y"}  # E2B: one param, & joined
    assert parse_metadata_filter(["k="]) == {"k": ""}
    with pytest.raises(BadRequestError, match="key=value"):
        parse_metadata_filter(["novalue"])


async def _client(app: FastAPI, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers or {}, timeout=120)


@pytest.fixture
async def api(manager: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(manager, ApiSettings())
    async with await _client(app) as c:
        yield c
    for info in await manager.list():
        await manager.destroy(info.id)


def _assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    err: dict[str, Any] = body["error"]
    return err


@pytest.mark.root
async def test_errors_have_one_shape(api: httpx.AsyncClient) -> None:
    _assert_error(await api.get("/v1/sandboxes/nope"), 404, "sandbox_not_found")
    # an id with an encoded "/" matches no route once decoded: still an unknown id, of its kind
    for method, path, code in (("GET", "/v1/sandboxes/a%2Fb", "sandbox_not_found"),
                               ("DELETE", "/v1/sandboxes/x%2fcommands", "sandbox_not_found"),
                               ("DELETE", "/v1/snapshots/s%2F1", "snapshot_not_found"),
                               ("GET", "/v1/workspaces/w%2F2?x=1", "workspace_not_found")):  # fmt: skip
        err = _assert_error(await api.request(method, path), 404, code)
        assert "/" in err["message"].split("'")[1], err
    err = _assert_error(await api.post("/v1/sandboxes", json={"timeout": "soon"}), 400, "bad_request")
    assert "timeout" in err["message"]
    _assert_error(await api.post("/v1/sandboxes", json={"bogus": 1}), 400, "bad_request")
    _assert_error(
        await api.post("/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "bad_request",
    )
    _assert_error(await api.get("/v1/nothing-here"), 404, "not_found")
    _assert_error(await api.patch("/v1/sandboxes"), 405, "bad_request")
    _assert_error(await api.get("/v1/sandboxes", params={"state": "sleeping"}), 400, "bad_request")
    _assert_error(await api.get("/v1/sandboxes", params={"metadata": "novalue"}), 400, "bad_request")
    _assert_error(await api.post("/v1/sandboxes", json={"template": "no-such"}), 404, "template_not_found")


@pytest.mark.root
async def test_create_run_files_and_metrics(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/sandboxes", json={"metadata": {"t": "1"}, "envs": {"A": "x"}, "timeout": 120})
    assert r.status_code == 201, r.text
    sbx = r.json()
    assert sbx["state"] == "running"
    assert sbx["timings"]["total"] > 0
    assert sbx["end_at"] is not None
    sid = sbx["sandbox_id"]
    base = f"/v1/sandboxes/{sid}"
    run = (await api.post(base + "/commands", json={"cmd": "printf '\\xff'; echo $A"})).json()
    assert run["stdout"] == "\ufffdx\n"  # invalid UTF-8 is replaced, as documented
    up = await api.put(base + "/files", params={"path": "/work/f.bin", "mode": 0o600}, content=b"\x00\x01" * 1000)
    assert up.json()["size"] == 2000
    assert up.json()["mode"] & 0o777 == 0o600
    down = await api.get(base + "/files", params={"path": "/work/f.bin"})
    assert down.headers["content-type"] == "application/octet-stream"
    assert down.content == b"\x00\x01" * 1000
    _assert_error(await api.get(base + "/files", params={"path": "/work/missing"}), 404, "file_not_found")
    empty = await api.put(base + "/files", params={"path": "/work/empty"}, content=b"")
    assert empty.json()["size"] == 0
    assert (await api.get(base + "/files", params={"path": "/work/empty"})).content == b""
    await api.post(base + "/pause")
    _assert_error(await api.post(base + "/commands", json={"cmd": "true"}), 409, "invalid_state")
    assert (await api.post(base + "/resume")).json()["state"] == "running"
    assert (await api.get("/v1/sandboxes", params={"metadata": "t=1"})).json()[0]["sandbox_id"] == sid
    assert (await api.get("/v1/sandboxes", params={"metadata": "t=2"})).json() == []
    assert (await api.get("/v1/sandboxes", params={"state": "paused"})).json() == []
    assert (await api.delete(base)).status_code == 204
    metrics = (await api.get("/metrics")).text
    assert 'branchbox_create_duration_seconds_count{backend="container",outcome="ok",source="cold"} 1.0' in metrics
    assert 'branchbox_exec_duration_seconds_count{backend="container",outcome="ok"}' in metrics
    assert 'branchbox_errors_total{code="file_not_found",layer="api"} 1.0' in metrics
    assert 'branchbox_errors_total{code="invalid_state",layer="api"} 1.0' in metrics
    assert 'route="/v1/sandboxes/{sandbox_id}/files"' in metrics
    assert 'branchbox_sandboxes{state="running"} 0.0' in metrics


@pytest.mark.root
async def test_auth_required_off_loopback(manager: Any) -> None:
    key = generate_api_key()
    app = create_app(manager, ApiSettings(host="0.0.0.0", api_key_hashes=(hash_api_key(key),)))
    async with await _client(app) as anon:
        assert (await anon.get("/health")).status_code == 200
        assert (await anon.get("/version")).status_code == 200
        _assert_error(await anon.get("/v1/sandboxes"), 401, "unauthorized")
        _assert_error(await anon.get("/metrics"), 401, "unauthorized")
        _assert_error(await anon.get("/v1/templates", headers={"authorization": "Bearer bad"}), 401, "unauthorized")
    async with await _client(app, {"authorization": f"Bearer {key}"}) as ok:
        assert (await ok.get("/v1/sandboxes")).json() == []
        names = [t["name"] for t in (await ok.get("/v1/templates")).json()]
        assert "default" in names
        assert "branchbox_errors_total" in (await ok.get("/metrics")).text


@pytest.mark.root
async def test_keys_optional_on_loopback(manager: Any) -> None:
    key = generate_api_key()
    app = create_app(manager, ApiSettings(api_key_hashes=(hash_api_key(key),)))
    async with await _client(app) as anon:
        assert (await anon.get("/v1/sandboxes")).status_code == 200
        _assert_error(await anon.get("/v1/sandboxes", headers={"authorization": "Bearer nope"}), 401, "unauthorized")


@pytest.mark.root
async def test_fast_path_routes_match_the_fastapi_routes(manager: Any) -> None:
    """create, get and a foreground run skip FastAPI (api/fastpath.py): same bodies, errors, auth and metrics."""
    key = generate_api_key()
    app = create_app(manager, ApiSettings(host="0.0.0.0", api_key_hashes=(hash_api_key(key),)))
    async with await _client(app) as anon:
        _assert_error(await anon.post("/v1/sandboxes", json={}), 401, "unauthorized")
        _assert_error(await anon.get("/v1/sandboxes/x"), 401, "unauthorized")
        _assert_error(await anon.post("/v1/sandboxes/x/commands", json={"cmd": "true"}), 401, "unauthorized")
    async with await _client(app, {"authorization": f"Bearer {key}"}) as api:
        try:
            r = await api.post("/v1/sandboxes", json={"metadata": {"k": "v"}})
            assert r.status_code == 201, r.text
            assert r.headers["content-type"] == "application/json"
            sid = r.json()["sandbox_id"]
            one = (await api.get(f"/v1/sandboxes/{sid}")).json()  # fast path
            listed = (await api.get("/v1/sandboxes")).json()  # FastAPI route, FastAPI's serialisation
            assert listed == [one]
            assert one == r.json()
            base = f"/v1/sandboxes/{sid}/commands"
            run = await api.post(base, json={"cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
            assert run.status_code == 200
            assert {k: v for k, v in run.json().items() if k != "duration_ms"} == {
                "exit_code": 3, "stdout": "out\n", "stderr": "err\n", "signal": None,
                "stdout_truncated": False, "stderr_truncated": False,
            }  # fmt: skip
            bg = await api.post(base, json={"cmd": "sleep 30", "background": True})  # handed on to FastAPI
            assert bg.json() == {"pid": bg.json()["pid"], "background": True}
            # invalid bodies are handed on too, so the 400 messages are FastAPI's
            err = _assert_error(await api.post(base, json={"cmd": []}), 400, "bad_request")
            assert "cmd" in err["message"]
            _assert_error(await api.post(base, content=b"cmd=true", headers={"content-type": "text/plain"}), 400,
                          "bad_request")  # fmt: skip
            _assert_error(await api.post("/v1/sandboxes", json={"cpu": 0}), 400, "bad_request")
            _assert_error(await api.post("/v1/sandboxes/nope/commands", json={"cmd": "true"}), 404,
                          "sandbox_not_found")  # fmt: skip
            _assert_error(await api.get("/v1/sandboxes/nope"), 404, "sandbox_not_found")
            metrics = (await api.get("/metrics")).text
            assert 'route="/v1/sandboxes/{sandbox_id}/commands",status="200"' in metrics
            assert 'route="/v1/sandboxes",status="201"' in metrics
            assert 'branchbox_errors_total{code="unauthorized",layer="api"} 3.0' in metrics
            assert 'branchbox_errors_total{code="sandbox_not_found",layer="api"} 2.0' in metrics
        finally:
            for info in await manager.list():
                await manager.destroy(info.id)
