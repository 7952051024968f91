"""Make FastAPI build its per-route state at start-up instead of on the first requests.

FastAPI builds the state of the routes of an included router (dependency graphs, pydantic adapters) lazily, the
first time a request is matched against that router: ~100 ms for this app's routers, paid by whichever request
first reaches each router after a start (e.g. the first ``DELETE`` after a restart). One request for a path no
route matches walks every router, so it builds all of them. It goes to the router directly: no middleware, no
access log, no metrics, nothing of the Manager.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import Message

WARMUP_PATH = "/.branchbox-warmup"  # matches no route (routes start with /v1/ or are /health, /version, ...)


async def warm_routes(app: FastAPI) -> int:
    """Route one unmatched GET through ``app``'s router; returns the status it answered (404)."""
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": WARMUP_PATH,
        "raw_path": WARMUP_PATH.encode("ascii"),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("127.0.0.1", 0),
        "client": ("127.0.0.1", 0),
    }
    await app.router(scope, receive, send)
    return status
