"""The checked-in OpenAPI document: it is what the app generates, live responses of a real daemon match it, and
schemathesis fuzzing against it (valid and invalid input) finds no 5xx."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode

from branchbox.api import openapi_json
from tests.conftest import DaemonProc, cli_env

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
# Tar bodies are fuzzed as the arbitrary bytes they are typed as (format: binary), like octet-stream ones.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


def load_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DOC_PATH.read_text())
    return doc


def test_checked_in_document_is_current() -> None:
    assert DOC_PATH.read_text() == openapi_json(), (
        "docs/openapi.json is stale: run `branchbox openapi -o docs/openapi.json`"
    )


def test_cli_prints_the_same_document() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "branchbox.cli", "openapi"], env=cli_env(), capture_output=True, check=True
    )
    assert out.stdout.decode() == DOC_PATH.read_text()


def test_document_shape() -> None:
    doc = load_doc()
    assert doc["openapi"].startswith("3.")
    for template, item in doc["paths"].items():
        assert template.startswith(("/v1/", "/health", "/version", "/metrics")), template
        for method, op in item.items():
            assert "422" not in op["responses"], f"{method} {template}: validation errors are 400 ErrorResponse"
    assert "ErrorResponse" in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


class Contract:
    """Validates live responses against the operation, status and schema of the checked-in document."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.seen: set[tuple[str, str, int]] = set()
        self._templates = [
            (re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", t) + "$"), t) for t in sorted(doc["paths"], key=len)
        ]

    def template_of(self, path: str) -> str:
        matches = [t for rx, t in self._templates if rx.match(path)]
        assert matches, f"{path} is not in the document"
        return min(matches, key=lambda t: t.count("{"))  # a literal segment beats a parameter

    def check(self, resp: httpx.Response) -> httpx.Response:
        method = resp.request.method.lower()
        template = self.template_of(resp.request.url.path)
        op = self.doc["paths"][template].get(method)
        assert op is not None, f"{method} {template} is not documented"
        status = str(resp.status_code)
        assert status in op["responses"], f"{method} {template} answered an undocumented {status}: {resp.text}"
        content = op["responses"][status].get("content", {})
        ctype = resp.headers.get("content-type", "").split(";")[0]
        if resp.status_code == 204:
            assert resp.content == b""
        elif ctype == "application/json":
            assert "application/json" in content, f"{method} {template} {status}: JSON not documented"
            schema = {**content["application/json"]["schema"], "components": self.doc["components"]}
            errors = [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(resp.json())]
            assert not errors, f"{method} {template} {status}: {errors[:3]}"
        else:
            assert any(ctype.startswith(c.split(";")[0]) for c in content), f"{method} {template}: {ctype}"
        self.seen.add((method, template, resp.status_code))
        return resp


@pytest.mark.root
def test_live_responses_match_the_document(daemon: DaemonProc) -> None:
    contract = Contract(load_doc())
    with httpx.Client(base_url=daemon.url, timeout=120, event_hooks={"response": [lambda r: r.read()]}) as c:
        ck = contract.check
        ck(c.get("/health"))
        ck(c.get("/version"))
        ck(c.get("/metrics"))
        ck(c.get("/v1/templates"))
        sbx = ck(c.post("/v1/sandboxes", json={"metadata": {"a": "b"}, "timeout": 100})).json()
        base = f"/v1/sandboxes/{sbx['sandbox_id']}"
        ck(c.post("/v1/sandboxes", json={"template": "missing"}))
        ck(c.post("/v1/sandboxes", json={"cpu": -1}))
        ck(c.get("/v1/sandboxes", params={"metadata": "a=b", "state": "running"}))
        ck(c.get(base))
        ck(c.get("/v1/sandboxes/none"))
        ck(c.post(base + "/timeout", json={"timeout": 200}))
        ck(c.post(base + "/timeout", json={"timeout": None}))
        ck(c.post(base + "/commands", json={"cmd": ["sh", "-c", "echo hi; exit 2"], "envs": {"X": "1"}}))
        bg = ck(c.post(base + "/commands", json={"cmd": "sleep 60", "background": True})).json()
        ck(c.get(base + "/commands"))
        ck(c.post(f"{base}/commands/{bg['pid']}/kill", json={"signal": 15}))
        ck(c.post(f"{base}/commands/999999/kill"))
        ck(c.put(base + "/files", params={"path": "/work/a.txt"}, content=b"hello"))
        ck(c.get(base + "/files", params={"path": "/work/a.txt"}))
        ck(c.get(base + "/files", params={"path": "/work/none"}))
        ck(c.get(base + "/files/list", params={"path": "/work", "depth": 2}))
        ck(c.get(base + "/files/stat", params={"path": "/work/a.txt"}))
        ck(c.post(base + "/files/mkdir", json={"path": "/work/d"}))
        ck(c.post(base + "/files/rename", json={"src": "/work/a.txt", "dst": "/work/d/b.txt"}))
        ck(c.delete(base + "/files", params={"path": "/work/d", "recursive": "true"}))
        ck(c.post(base + "/pause"))
        ck(c.post(base + "/commands", json={"cmd": "true"}))  # 409 while paused
        ck(c.post(base + "/resume"))
        ck(c.delete(base))
        ck(c.delete(base))
        ck(c.get("/v1/pools"))
        ck(c.put("/v1/pools/default", json={"min_size": 0, "target_free": 0, "max_size": 1, "memory_mb": 64}))
        ck(c.put("/v1/pools/default", json={"min_size": 2, "max_size": 1}))
        ck(c.put("/v1/pools/missing", json={}))
        ck(c.get("/v1/pools"))
        ck(c.get("/v1/pools/default"))
        ck(c.get("/v1/pools/missing"))
        ck(c.delete("/v1/pools/default"))
        ck(c.delete("/v1/pools/default"))
    statuses = {s for _, _, s in contract.seen}
    assert {200, 201, 204, 400, 404, 409} <= statuses


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_schemathesis_fuzz_finds_no_server_errors(daemon: DaemonProc) -> None:
    schema = schemathesis.openapi.from_path(str(DOC_PATH))
    real = httpx.post(daemon.url + "/v1/sandboxes", json={}, timeout=120).json()["sandbox_id"]
    failures: list[str] = []
    calls: list[int] = []
    for result, mode in itertools.product(schema.get_all_operations(), GenerationMode):
        op = result.ok()

        @hypothesis.given(case=op.as_strategy(mode), use_real=st.booleans())
        @hypothesis.settings(
            max_examples=12,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def run(case: Any, use_real: bool) -> None:
            params = case.path_parameters or {}
            if use_real and "sandbox_id" in params and case.method.upper() != "DELETE":
                params["sandbox_id"] = real
            resp = case.call(base_url=daemon.url, timeout=120)
            calls.append(resp.status_code)
            # documented answers, not server errors: 501 not_supported (e.g. an unknown backend name) and 504
            # timeout (a command that ran past its own timeout=)
            if resp.status_code >= 500 and resp.status_code not in (501, 504):
                failures.append(f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200} -> "
                                f"{resp.status_code} {resp.text[:300]}")  # fmt: skip
            assert resp.status_code != 422  # validation errors are 400 with the one error shape

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid form
    assert len(calls) > 2 * len(list(schema.get_all_operations()))
    assert not failures, "\n".join(failures[:10]) + "\n" + daemon.log()[-3000:]
