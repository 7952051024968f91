"""The app's start-up builds FastAPI's per-route state, so no request after it pays for that."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import routing

from branchbox.api import ApiSettings, create_app
from branchbox.api.warmup import warm_routes


def _count_route_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each route whose state FastAPI builds (lazily, per included router, on first match)."""
    included = getattr(routing, "_IncludedRouter", None)
    if included is None or not hasattr(included, "_build_effective_context"):
        pytest.skip("this FastAPI builds no per-router route state lazily (fastapi.routing._IncludedRouter)")
    built: list[str] = []
    original = included._build_effective_context

    def spy(self: Any, route: Any) -> Any:
        built.append(str(getattr(route, "path", route)))
        return original(self, route)

    monkeypatch.setattr(included, "_build_effective_context", spy)
    return built


async def test_startup_builds_every_route_so_requests_build_none(manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _count_route_builds(monkeypatch)
    app = create_app(manager, ApiSettings())
    async with app.router.lifespan_context(app):  # what uvicorn runs at start
        at_start = len(built)
        assert at_start > 0, "the start-up built no route state"
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            assert (await c.get("/v1/pools")).status_code == 200  # the last routers of the app
            assert (await c.get("/v1/templates")).status_code == 200
            assert (await c.get("/no/such/route")).status_code == 404  # walks every router
        assert built[at_start:] == [], "requests after the start-up built route state"


async def test_warm_routes_answers_not_found_without_the_middleware(manager: Any) -> None:
    app = create_app(manager, ApiSettings())
    assert await warm_routes(app) == 404
    metrics = app.state.ctx.metrics.render().decode()
    assert "warmup" not in metrics  # not seen by the access log / latency histogram
