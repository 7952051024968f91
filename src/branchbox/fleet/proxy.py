"""The controller's HTTP front: the daemon's API, served for the whole fleet (``branchbox fleet serve``).

Why a proxy by id and not a Manager facade behind ``create_app``: the daemon's API has some 40 routes (files as
streams both ways, WebSockets, the port proxy, snapshots, forks); a facade would re-implement each over the
network and drift from the daemon. Instead the controller answers what needs the whole fleet itself (create:
allocate then call the chosen node; lists: ask every node and merge; the fleet's own routes) and forwards every
request about one sandbox or snapshot, bytes and WebSocket frames as they come, to the node that holds it. The
SDK and CLI work unchanged against either. The SDK is not redirected to the node: nodes may sit on a private
network the controller alone reaches, and a sandbox id stays valid when its node's address changes.

* ``POST /v1/sandboxes``: placement labels come from the ``fleet.labels`` metadata key (``region=eu,kvm=1``).
  The answer's ``timings`` gain ``fleet_allocate``, ``fleet_node_call`` (the node's ``total`` is its create) and
  ``fleet_total``, and the histogram ``branchbox_fleet_create_seconds{phase}`` counts them; header
  ``x-branchbox-node`` names the node. A restore (``snapshot``) goes to the node that holds the snapshot: a
  snapshot is not moved between nodes, and one on a lost node answers ``sandbox_lost``.
* A sandbox whose node is lost answers ``503 sandbox_lost``; one no node knows, ``404 sandbox_not_found``.
* ``GET /v1/fleet/nodes``; ``POST /v1/fleet/nodes/{node}/drain`` (``{"draining": false}`` undoes it).
* ``POST /v1/workspaces`` is placed like a create (by its template; ``fleet.labels`` in its metadata), the
  caller's ``X-Git-Token`` goes with it; a workspace's own routes go to its node; ``GET /v1/workspaces`` merges
  every node's. ``/v1/pools``: configured on, and summed over, every node holding the template (fleet/pools.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import branchbox.fleet.pools as fleet_pools
from branchbox.api.auth import ApiKeyChecker
from branchbox.api.ports import relay_websocket
from branchbox.errors import (
    BadRequestError,
    BranchboxError,
    NotSupportedError,
    SandboxLostError,
    SandboxNotFoundError,
    SnapshotNotFoundError,
    WorkspaceNotFoundError,
)
from branchbox.fleet.controller import Controller
from branchbox.fleet.node import parse_labels
from branchbox.fleet.registry import Request
from branchbox.sdk._awire import AsyncWire
from branchbox.sdk._config import ConnectionConfig
from branchbox.sdk._http1 import InvalidRequest, WireError, fixed_head

log = structlog.get_logger("branchbox.fleet")

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "proxy-connection"}
# the node connection's own: its fixed head (accept, user-agent), the body's framing and type (passed apart)
_NOT_FORWARDED = _HOP | {"accept", "user-agent", "content-type", "content-length"}
SMALL_BODY = 1 << 20  # a forwarded body up to this size is read first and sent with its length (a pooled connection)
LABELS_KEY = "fleet.labels"


def _error(exc: BranchboxError) -> JSONResponse:
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """An empty body is {}; anything but a JSON object is None."""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _nodes(names: list[str]) -> dict[str, str]:
    return {"x-branchbox-nodes": ",".join(names)}


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED}


def _query(request: HttpRequest) -> str:
    return "?" + request.url.query if request.url.query else ""


def _auth_only(headers: Any) -> dict[str, str]:
    """For the controller's own lookups (GETs without a body): the caller's credentials, nothing of its body."""
    return {k: v for k, v in headers.items() if k.lower() == "authorization"}


class FleetFront:
    """The ASGI app's state: the controller, pooled connections to each node (the SDK's client), the create
    histogram."""

    def __init__(self, controller: Controller, *, keys: ApiKeyChecker, version: str) -> None:
        self.controller = controller
        self.keys = keys
        self.version = version
        # every request to a node goes over the SDK's pooled keep-alive connections, one pool per node: httpx's
        # async client added ~1.6 ms per request (docs/api.md), most of what the controller added to a create
        self.wires: dict[str, AsyncWire] = {}
        self.metrics = CollectorRegistry()
        self.create_seconds = Histogram(
            "branchbox_fleet_create_seconds",
            "Creates through the fleet controller, per phase (allocate, node_call, node_create, total)",
            ["phase"],
            registry=self.metrics,
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        # pools PUT through this controller, (template, backend) -> (path, query, body, the caller's credentials,
        # in memory only): replayed on nodes that join later
        self.pool_specs: dict[tuple[str, str], tuple[str, str, bytes, dict[str, str]]] = {}
        controller.reconcile = self.reconcile
        controller.on_join = self.configure_pools

    # ------------------------------------------------------------------ helpers

    def wire(self, url: str) -> AsyncWire:
        wire = self.wires.get(url)
        if wire is None:
            config = ConnectionConfig(base_url=url, api_key=None, request_timeout=None)
            wire = self.wires[url] = AsyncWire(config, connect_timeout=5.0)
        return wire

    async def aclose(self) -> None:
        for wire in self.wires.values():
            wire.close()
        self.wires.clear()

    def check(self, request: HttpRequest | WebSocket) -> None:
        self.keys.check(request.headers.get("authorization"))

    async def _ask_all(self, path: str, headers: dict[str, str], query: str = "") -> list[tuple[str, Any]]:
        """GET ``path`` on every live node at once: (node, JSON) of those that answered 200."""
        nodes = self.controller.live_nodes()
        extra = fixed_head(headers)

        async def one(node: str, url: str) -> tuple[str, Any] | None:
            try:
                resp = await self.wire(url).request("GET", path, None, 10.0, query=query, extra=extra)
            except WireError:
                return None
            return (node, resp.json()) if resp.status_code == 200 else None

        got = await asyncio.gather(*(one(v.node_id, v.url) for v in nodes))
        return [g for g in got if g is not None]

    async def owner(self, kind: str, ident: str, headers: dict[str, str]) -> str:
        """The node holding sandbox (or snapshot) ``ident``: remembered, else asked of every live node."""
        table = self.controller.owner_tables[kind]
        node = table.get(ident)
        if node is not None:
            return node
        found = await self._ask_all(f"/v1/{kind}/{quote(ident, safe='')}", headers)
        if found:
            table[ident] = found[0][0]
            return found[0][0]
        lost = [n for n in self.controller.lost_why if n in self.controller.registry]
        if kind == "sandboxes":
            hint = f" (nodes lost right now: {', '.join(sorted(lost))})" if lost else ""
            raise SandboxNotFoundError(
                f"no node of the fleet has sandbox {ident!r}{hint}: list them with `branchbox ls`"
            )
        if kind == "workspaces":
            raise WorkspaceNotFoundError(
                f"no node of the fleet has workspace {ident!r}: list them with GET /v1/workspaces"
            )
        raise SnapshotNotFoundError(f"no node of the fleet has snapshot {ident!r}: list them with GET /v1/snapshots")

    async def reconcile(self, node: str) -> None:
        """After a rejoin: learn which sandboxes the node holds again (an owner entry also comes back lazily)."""
        with contextlib.suppress(Exception):
            url = self.controller.node_url(node)
            resp = await self.wire(url).request("GET", "/v1/sandboxes", None, 10.0)
            if resp.status_code == 200:
                for sbx in resp.json():
                    self.controller.owners[sbx["sandbox_id"]] = node
                log.info("fleet.reconciled", node=node, sandboxes=len(resp.json()))

    async def configure_pools(self, node: str) -> None:
        """A node joined (or its daemon restarted): it gets the pools configured through this controller for
        the templates it holds, as every node had them (a DaemonSet's way; a node's own [pools] tables stay)."""
        if node not in self.controller.registry:  # gone again before its turn
            return
        view = self.controller.registry.get(node)
        for (template, backend), (path, query, body, auth) in list(self.pool_specs.items()):
            if (template, backend) not in view.templates:
                continue
            got = await fleet_pools.send(self.wire(view.url), "PUT", path, query=query, body=body, auth=auth)
            ok = got is not None and got.status_code == 200
            log.info("fleet.pool_given", node=node, template=template, backend=backend, ok=ok)

    async def forward(self, request: HttpRequest, node: str, path: str) -> Response:
        try:
            base = self.controller.node_url(node)
        except BranchboxError as exc:
            return _error(exc)
        headers = _forward_headers(request.headers)
        content: bytes | AsyncIterator[bytes] | None = None
        if request.method not in ("GET", "HEAD", "DELETE"):
            length = request.headers.get("content-length", "")
            small = length.isdigit() and int(length) <= SMALL_BODY
            content = await request.body() if small else request.stream()
        stack = contextlib.AsyncExitStack()
        try:
            resp = await stack.enter_async_context(
                self.wire(base).stream(
                    request.method,
                    path,
                    None,
                    3600.0,
                    query=_query(request),
                    content=content,
                    extra=fixed_head(headers),
                    content_type=request.headers.get("content-type"),
                )
            )
        except InvalidRequest as exc:  # a header the node connection cannot carry: the caller's to fix
            await stack.aclose()
            return _error(BadRequestError(f"cannot forward this request: {exc}"))
        except WireError as exc:
            await stack.aclose()
            return _error(
                SandboxLostError(
                    f"node {node!r} did not answer ({type(exc).__name__}): the sandbox is unreachable; "
                    "see `branchbox fleet nodes`",
                    node=node,
                )
            )

        async def body() -> AsyncIterator[bytes]:
            try:
                async for part in resp.aiter_bytes():
                    yield part
            finally:  # read to its end: the connection is pooled again; else it is closed
                await stack.aclose()

        out_headers = {k: v for k, v in resp.headers.items() if k not in _HOP}
        return StreamingResponse(body(), status_code=resp.status_code, headers=out_headers)


def create_fleet_app(front: FleetFront) -> Starlette:
    controller = front.controller

    async def health(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "nodes": len(controller.live_nodes())})

    async def version(request: HttpRequest) -> Response:
        return JSONResponse({"version": front.version})

    async def metrics(request: HttpRequest) -> Response:
        front.check(request)
        return Response(generate_latest(front.metrics), media_type=CONTENT_TYPE_LATEST)

    async def nodes(request: HttpRequest) -> Response:
        front.check(request)
        return JSONResponse(controller.describe())

    async def drain(request: HttpRequest) -> Response:
        front.check(request)
        body = _json_object(await request.body())
        if body is None or not isinstance(body.get("draining", True), bool):
            raise BadRequestError('body: {"draining": true|false} (or none: true)')
        node = request.path_params["node"]
        controller.registry.drain(node, body.get("draining", True))
        desc = next(d for d in controller.describe() if d["node"] == node)
        return JSONResponse(desc)

    async def create(request: HttpRequest, kind: str = "sandboxes") -> Response:
        """A sandbox, or a workspace (a sandbox with a checkout: placed the same way, by its template)."""
        t0 = time.perf_counter()
        front.check(request)
        raw = await request.body()
        body = _json_object(raw)
        schema = "CreateSandboxRequest" if kind == "sandboxes" else "CreateWorkspaceRequest"
        if body is None:
            raise BadRequestError(f"the body must be a JSON object (see docs/openapi.json: {schema})")
        # what the node reads from headers: the caller's key, and a workspace's git token
        extra = b"".join(
            f"{name}: {value}\r\n".encode("latin-1")
            for name in ("authorization", "x-git-token")
            if (value := request.headers.get(name))
        )
        snapshot = body.get("snapshot") if kind == "sandboxes" else None
        alloc = None
        if snapshot:  # a restore runs where its snapshot is: snapshots are not moved between nodes
            node = await front.owner("snapshots", str(snapshot), _auth_only(request.headers))
            url = controller.node_url(node)
        else:
            metadata = body.get("metadata") or {}
            labels = parse_labels(str(metadata.get(LABELS_KEY, ""))) if isinstance(metadata, dict) else {}
            try:
                req = Request(
                    str(body.get("template") or "default"),
                    str(body.get("backend") or controller.settings.default_backend),
                    max(0, int(body.get("memory_mb") or 512)),  # below 0: the node's own error says why
                    max(0, round(float(body.get("cpu") or 1.0) * 1000)),
                    tuple(sorted(labels.items())),
                )
            except (TypeError, ValueError, OverflowError) as exc:  # Infinity is JSON to Python
                raise BadRequestError(f"invalid request: {exc} (see docs/openapi.json: {schema})") from None
            alloc = await controller.place(req, controller.settings.placement_timeout)
            node, url = alloc.node_id, alloc.url
        t1 = time.perf_counter()
        try:
            resp = await front.wire(url).request("POST", f"/v1/{kind}", raw, 300.0, extra=extra)
        except WireError as exc:
            if alloc is not None:
                controller.registry.release(alloc)
            raise SandboxLostError(
                f"node {node!r} did not answer the create ({type(exc).__name__}); nothing was made through the "
                "controller: try again (the node will be avoided once it is lost)",
                node=node,
            ) from None
        t2 = time.perf_counter()
        if resp.status_code != 201:
            if alloc is not None:
                controller.registry.release(alloc)
            return Response(resp.content, status_code=resp.status_code, media_type="application/json")
        data = resp.json()
        sandbox_id = data.get("sandbox_id")  # a workspace made with wait=false has none yet
        ident = str(data["id"]) if kind == "workspaces" else str(sandbox_id or "")  # what its destroy will name
        if alloc is not None:
            controller.registry.commit(alloc, now=controller.clock(), ident=ident)
        if sandbox_id:
            controller.owners[sandbox_id] = node
        if kind == "workspaces":
            controller.workspace_owners[ident] = node
        timings = data.setdefault("timings", {})
        node_create = float(timings.get("total", 0.0))
        t3 = time.perf_counter()
        timings.update(
            fleet_allocate=round((t1 - t0) * 1e3, 3),
            fleet_node_call=round((t2 - t1) * 1e3, 3),
            fleet_total=round((t3 - t0) * 1e3, 3),
        )
        for phase, secs in (
            ("allocate", t1 - t0),
            ("node_call", t2 - t1),
            ("node_create", node_create / 1e3),
            ("total", t3 - t0),
        ):
            if kind == "sandboxes":  # a workspace's time is mostly git's: it would blur the sandbox figures
                front.create_seconds.labels(phase).observe(secs)
        return JSONResponse(data, status_code=201, headers={"x-branchbox-node": node})

    async def list_all(request: HttpRequest, kind: str) -> Response:
        front.check(request)
        headers = _auth_only(request.headers)
        answers = await front._ask_all(f"/v1/{kind}", headers, query=_query(request))
        merged: list[Any] = []
        seen: set[str] = set()
        for node, items in answers:
            for item in items:
                ident = item.get("sandbox_id") or item.get("snapshot_id") or item.get("name")
                if kind == "sandboxes":
                    controller.owners[item["sandbox_id"]] = node
                elif kind == "workspaces":
                    controller.workspace_owners[item["id"]] = node
                    if item.get("sandbox_id"):
                        controller.owners[item["sandbox_id"]] = node
                elif kind == "snapshots":
                    controller.snapshot_owners[item["snapshot_id"]] = node
                if kind == "templates":
                    if ident in seen:
                        continue
                    seen.add(ident)
                merged.append(item)
        return JSONResponse(merged)

    async def sandboxes(request: HttpRequest) -> Response:
        if request.method == "POST":
            return await create(request)
        return await list_all(request, "sandboxes")

    async def workspaces(request: HttpRequest) -> Response:
        if request.method == "POST":
            return await create(request, "workspaces")
        return await list_all(request, "workspaces")

    async def snapshots(request: HttpRequest) -> Response:
        return await list_all(request, "snapshots")

    async def templates(request: HttpRequest) -> Response:
        return await list_all(request, "templates")

    async def one(request: HttpRequest) -> Response:
        kind, ident = request.path_params["kind"], request.path_params["ident"]
        if kind not in ("sandboxes", "snapshots", "workspaces"):
            return await unsupported(request)
        front.check(request)
        rest = request.path_params.get("rest", "")
        node = await front.owner(kind, ident, _auth_only(request.headers))
        path = f"/v1/{kind}/{quote(ident, safe='')}" + (f"/{rest}" if rest else "")
        resp = await front.forward(request, node, path)
        deleted = request.method == "DELETE" and not rest and resp.status_code in (200, 204)
        if deleted and kind in ("sandboxes", "workspaces"):  # a workspace's sandbox goes with it
            controller.owner_tables[kind].pop(ident, None)
            controller.registry.forget(node, ident)  # a hold still kept for its create gives its room back
        return resp

    async def pools(request: HttpRequest) -> Response:
        front.check(request)
        answers = await front._ask_all("/v1/pools", _auth_only(request.headers))
        return JSONResponse(fleet_pools.merge(answers))

    async def pool(request: HttpRequest) -> Response:
        """One template's pool on every node (fleet/pools.py)."""
        front.check(request)
        template = request.path_params["template"]
        backend = request.query_params.get("backend") or controller.settings.default_backend
        path, query = f"/v1/pools/{quote(template, safe='')}", _query(request)
        auth = _auth_only(request.headers)
        if request.method == "GET":
            found = await front._ask_all(path, auth, query=query)
            if not found:
                raise fleet_pools.not_found(template, backend, held=True)
            return JSONResponse(fleet_pools.aggregate([a for _, a in found]), headers=_nodes([n for n, _ in found]))
        live = controller.live_nodes()
        if request.method == "DELETE":  # draining nodes too: their members hold memory for nothing
            front.pool_specs.pop((template, backend), None)
            got = await asyncio.gather(
                *(fleet_pools.send(front.wire(v.url), "DELETE", path, query=query, body=None, auth=auth)
                  for v in live)
            )  # fmt: skip
            removed = [v.node_id for v, r in zip(live, got, strict=True) if r is not None and r.status_code == 204]
            silent = [v.node_id for v, r in zip(live, got, strict=True) if r is None]
            if silent:
                raise fleet_pools.unreachable(silent[0], removed, "removed")
            if removed:
                return Response(status_code=204, headers=_nodes(removed))
            answered = [r for r in got if r is not None and r.status_code != 404]
            if answered:
                return Response(answered[0].content, answered[0].status_code, media_type="application/json")
            raise fleet_pools.not_found(template, backend, held=True)
        targets = [(v.node_id, v.url) for v in live if not v.draining and (template, backend) in v.templates]
        if not targets:
            raise fleet_pools.not_found(template, backend, held=False)
        body = await request.body()
        done, answers, failure = await fleet_pools.put_everywhere(
            front.wire, targets, path, query=query, body=body, auth=auth
        )
        if done:  # configured somewhere: nodes that join later get it too
            front.pool_specs[(template, backend)] = (path, query, body, auth)
        if isinstance(failure, BranchboxError):
            raise failure
        if failure is not None:  # the node's own answer (a first node refusing the settings: nowhere configured)
            return Response(failure.content, failure.status_code, media_type="application/json", headers=_nodes(done))
        return JSONResponse(fleet_pools.aggregate(answers), headers=_nodes(done))

    async def unsupported(request: HttpRequest) -> Response:
        raise NotSupportedError(
            f"{request.url.path} is per node and not served by the fleet controller: call the node's daemon "
            "(its URL is in `branchbox fleet nodes`)"
        )

    async def ws(websocket: WebSocket) -> None:
        try:
            front.check(websocket)
            ident, rest = websocket.path_params["ident"], websocket.path_params["rest"]
            node = await front.owner("sandboxes", ident, _auth_only(websocket.headers))
            base = controller.node_url(node)
        except BranchboxError as exc:
            await websocket.close(code=4000 + exc.http_status, reason=exc.message[:120])
            return
        await relay(websocket, base, f"/v1/sandboxes/{quote(ident, safe='')}/{rest}")

    async def on_error(request: HttpRequest, exc: Exception) -> Response:
        if isinstance(exc, BranchboxError):
            return _error(exc)
        log.exception("fleet.internal_error", path=request.url.path, exc_info=exc)
        return _error(BranchboxError(f"the fleet controller failed: {type(exc).__name__}: {exc} (see its log)"))

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/version", version),
            Route("/metrics", metrics),
            Route("/v1/fleet/nodes", nodes),
            Route("/v1/fleet/nodes/{node}/drain", drain, methods=["POST"]),
            Route("/v1/sandboxes", sandboxes, methods=["GET", "POST"]),
            Route("/v1/workspaces", workspaces, methods=["GET", "POST"]),
            Route("/v1/snapshots", snapshots),
            Route("/v1/pools", pools),
            Route("/v1/pools/{template}", pool, methods=["GET", "PUT", "DELETE"]),
            Route("/v1/templates", templates),
            WebSocketRoute("/v1/sandboxes/{ident}/{rest:path}", ws),
            Route("/v1/{kind:str}/{ident}", one, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
            Route("/v1/{kind:str}/{ident}/{rest:path}", one, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
            Route("/{path:path}", unsupported, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ],
        exception_handlers={BranchboxError: on_error, Exception: on_error},
    )


async def relay(client: WebSocket, base: str, path: str) -> None:
    """Relay one WebSocket to the node, frames as they come, close codes passed on."""
    from websockets.asyncio.client import connect  # noqa: PLC0415
    from websockets.exceptions import InvalidStatus  # noqa: PLC0415

    url = "ws" + base.removeprefix("http") + path + (f"?{client.url.query}" if client.url.query else "")
    headers = {k: v for k, v in client.headers.items() if k.lower() == "authorization"}
    try:
        upstream = await connect(url, additional_headers=headers, max_size=16 * 1024 * 1024, open_timeout=10)
    except (OSError, InvalidStatus, TimeoutError) as exc:
        await client.close(code=1011, reason=f"the sandbox's node did not accept the stream: {exc}"[:120])
        return
    await client.accept()
    await relay_websocket(upstream, client.receive, client.send)  # the port proxy's relay: frames and close codes
