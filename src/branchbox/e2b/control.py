"""E2B's control plane (the REST API the SDK calls at ``E2B_API_URL``), answered by the Manager.

Routes: ``POST /sandboxes`` and ``/v2/sandboxes`` (create), ``GET /sandboxes`` and ``/v2/sandboxes`` (list: metadata
and state filters, newest first, ``limit`` + ``nextToken`` paging with ``X-Next-Token``), ``GET|DELETE
/sandboxes/{id}``, ``POST /sandboxes/{id}/{timeout,refreshes,connect,pause,resume,snapshots,fork}`` and
``/v2/sandboxes/{id}/connect``; ``GET /snapshots`` (``Sandbox.list_snapshots``: ``sandboxID`` and ``name``
filters, newest first, paged as the list) and ``DELETE /templates/{id}`` (``Sandbox.delete_snapshot``: a snapshot's
id or name; templates are not deleted here). Errors are ``{"code": <HTTP status>, "message": str}``: the SDK
reads nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, parse_qsl

from branchbox.e2b import idempotency
from branchbox.e2b.state import ENVD_VERSION, E2BState, iso
from branchbox.errors import BranchboxError, SnapshotNotFoundError, TemplateNotFoundError, UnauthorizedError
from branchbox.models import SandboxInfo, SandboxState

ROUTE = re.compile(r"^/(?:v2/)?sandboxes(?:/([^/]+)(?:/([a-z]+))?)?/?$")
TEMPLATE_ROUTE = re.compile(r"^/templates/([^/]+)/?$")
ALIAS_ROUTE = re.compile(r"^/templates/aliases/([^/]+)/?$")
PREFIXES = ("/sandboxes", "/v2/sandboxes", "/snapshots", "/templates", "/volumes", "/secrets")  # sent here
_UNSUPPORTED = {  # E2B APIs without a branchbox counterpart: a clear 501 in E2B's shape, not a 404 of the native API
    "/volumes": "volumes are not supported by this server: share files through snapshots or files.write",
    "/secrets": "secrets are not supported by this server: pass values to a sandbox as envs",
}
CLIENT_ID = "branchbox"
MAX_PAGE = 1000
_FOREVER = 253402300799.0  # 9999-12-31T23:59:59Z: endAt of a sandbox without a time to live


@dataclass(slots=True)
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def error(status: int, message: str) -> Reply:
    return Reply(status, {"code": status, "message": message})


def _from_branchbox(exc: BranchboxError) -> Reply:
    status = exc.http_status if exc.http_status < 500 or exc.http_status in (501, 503, 504) else 500
    if exc.code == "invalid_state":
        status = 409
    return error(status, exc.message)


def sandbox_json(state: E2BState, info: SandboxInfo) -> dict[str, Any]:
    """E2B's ``Sandbox`` (what create and connect answer)."""
    return {
        "templateID": info.template,
        "sandboxID": info.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": state.tokens.token(info.id),
        "domain": None,
    }


def listed_json(info: SandboxInfo, *, detail: bool = False, state: E2BState | None = None) -> dict[str, Any]:
    """E2B's ``ListedSandbox`` (and ``SandboxDetail`` with ``detail``)."""
    out: dict[str, Any] = {
        "templateID": info.template,
        "sandboxID": info.id,
        "clientID": CLIENT_ID,
        "startedAt": iso(info.created_at),
        "endAt": iso(info.expires_at if info.expires_at is not None else _FOREVER),
        "cpuCount": max(1, math.ceil(info.resources.cpu)),
        "memoryMB": info.resources.memory_mb,
        "diskSizeMB": 0,
        "state": "paused" if info.state is SandboxState.PAUSED else "running",
        "envdVersion": ENVD_VERSION,
        "metadata": dict(info.metadata),
    }
    if detail and state is not None:
        out["envdAccessToken"] = state.tokens.token(info.id)
        out["domain"] = None
        life = info.lifecycle
        on_timeout = "pause" if life.on_timeout == "pause" else "kill"
        out["lifecycle"] = {"onTimeout": on_timeout, "autoResume": life.auto_resume}
    return out


def check_api_key(state: E2BState, headers: dict[str, str]) -> Reply | None:
    """``X-API-KEY`` (the SDK's header) or ``Authorization: Bearer``, checked as the native API checks keys."""
    key = headers.get("x-api-key")
    authorization = f"Bearer {key}" if key else headers.get("authorization")
    try:
        state.check_key(authorization)
    except UnauthorizedError as exc:
        return error(401, exc.message)
    return None


def _body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest(f"the body is not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


class _BadRequest(Exception):
    pass


def _int(body: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadRequest(f"{key} must be a non-negative integer (seconds), not {value!r}")
    return value


def _str_map(body: dict[str, Any], key: str) -> dict[str, str]:
    value = body.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _BadRequest(f"{key} must be an object of strings")
    return value


async def handle(state: E2BState, method: str, path: str, query: str, headers: dict[str, str], raw: bytes) -> Reply:
    denied = check_api_key(state, headers)
    if denied is not None:
        return denied
    try:
        key = headers.get("idempotency-key")
        if key is not None and method == "POST" and ROUTE.match(path) and path.rstrip("/").endswith("sandboxes"):
            return await _create_once(state, headers, key, raw)
        return await _route(state, method, path, query, raw)
    except _BadRequest as exc:
        return error(400, str(exc))
    except BranchboxError as exc:
        return _from_branchbox(exc)


async def _route(state: E2BState, method: str, path: str, query: str, raw: bytes) -> Reply:
    m = ROUTE.match(path)
    if m is not None:
        body = _body(raw) if method in ("POST", "PUT") else {}
        return await _dispatch(state, method, m.group(1), m.group(2), query, body)
    if path.rstrip("/") == "/snapshots" and method == "GET":
        return await _list_snapshots(state, query)
    t = TEMPLATE_ROUTE.match(path)
    if t is not None and method == "DELETE":
        return await _delete_snapshot(state, t.group(1))
    unsupported = _UNSUPPORTED.get("/" + path.strip("/").split("/")[0])
    if unsupported is not None:
        return error(501, unsupported)
    a = ALIAS_ROUTE.match(path)
    if a is not None and method == "GET":
        return _alias(state, a.group(1))
    return error(404, f"no such route {method} {path}")


async def _dispatch(  # noqa: PLR0911 (one return per route)
    state: E2BState, method: str, sid: str | None, action: str | None, query: str, body: dict[str, Any]
) -> Reply:
    mgr = state.manager
    if sid is None:
        if method == "POST":
            return await _create(state, body)
        if method == "GET":
            return await _list(state, query)
    elif action in ("metrics", "logs") and method == "GET":
        await mgr.get(sid)  # 404 for an unknown sandbox
        return Reply(200, [] if action == "metrics" else {"logs": [], "logEntries": []})
    elif action is None:
        if method == "GET":
            info = await mgr.get(sid)
            if info.state not in _VISIBLE:  # E2B knows running and paused sandboxes only
                return error(404, f"sandbox {sid} is not running (it is {info.state.value}: {info.error or 'gone'})")
            return Reply(200, {**listed_json(info, detail=True, state=state), **await _network_json(state, sid)})
        if method == "DELETE":
            await mgr.destroy(sid)
            return Reply(204)
    elif action == "network" and method == "PUT":
        await mgr.update_network(sid, _network_patch(body))
        return Reply(204)
    elif method == "POST":
        if action in ("timeout", "refreshes"):
            refresh = action == "refreshes"
            seconds = _int(body, "duration" if refresh else "timeout", 60 if refresh else None)
            if seconds is None:
                raise _BadRequest("timeout is required (seconds)")
            if refresh:
                await _extend(state, sid, seconds)
            else:
                await mgr.set_timeout(sid, seconds)
            return Reply(204)
        if action in ("connect", "resume"):
            return await _connect(state, sid, _int(body, "timeout"), resume_only=action == "resume")
        if action == "pause":
            info = await mgr.get(sid)
            if info.state is SandboxState.PAUSED:
                return error(409, f"sandbox {sid} is already paused")
            await mgr.pause(sid)
            return Reply(204)
        if action == "snapshots":
            name = body.get("name")
            if name is not None and not isinstance(name, str):
                raise _BadRequest("name must be a string")
            snap = await mgr.snapshot(sid, name=name)
            return Reply(201, {"snapshotID": snap.id, "names": [snap.name] if snap.name else []})
        if action == "fork":
            return await _fork(state, sid, body)
    return error(405 if sid is None or action in _ACTIONS else 404, f"no such route {method} on this path")


_VISIBLE = (SandboxState.RUNNING, SandboxState.PAUSED)
_ACTIONS = frozenset({"timeout", "refreshes", "connect", "resume", "pause", "snapshots", "fork", "network"})
_NETWORK_KEYS = {"allowOut": "allow_out", "denyOut": "deny_out", "allow_internet_access": "allow_internet_access"}


async def _network_json(state: E2BState, sid: str) -> dict[str, Any]:
    """``SandboxDetail``'s ``allowInternetAccess`` and ``network`` (``allowOut``, ``denyOut``) from the sandbox's
    egress policy; nothing for a sandbox without a network (networking off in the daemon)."""
    try:
        policy = (await state.manager.get_network(sid)).policy.as_dict()
    except BranchboxError:
        return {}
    return {
        "allowInternetAccess": policy["allow_internet_access"],
        "network": {"allowOut": policy["allow_out"], "denyOut": policy["deny_out"]},
    }


def _network_patch(body: dict[str, Any]) -> dict[str, Any]:
    """``update_network``'s body as the Manager's egress patch: the keys present replace the current values.
    What branchbox's egress policy has no counterpart for is refused, so that nothing is half applied."""
    unknown = sorted(set(body) - set(_NETWORK_KEYS))
    if unknown:
        raise _BadRequest(f"network setting(s) {', '.join(unknown)} are not supported here: use allowOut, denyOut,"
                          " allow_internet_access")  # fmt: skip
    return {_NETWORK_KEYS[k]: v for k, v in body.items()}


async def _create_once(state: E2BState, headers: dict[str, str], key: str, raw: bytes) -> Reply:
    """A create with an ``Idempotency-Key``: the sandbox the key's first create made (branchbox.e2b.idempotency)."""
    if not idempotency.KEY.match(key):
        raise _BadRequest("Idempotency-Key must be 1-255 lowercase letters, digits and hyphens")
    body = _body(raw)
    credential = headers.get("x-api-key") or headers.get("authorization") or ""
    caller = hashlib.sha256(credential.encode()).hexdigest()  # keys are the caller's own

    async def create() -> str:
        return (await _create_info(state, body)).id

    try:
        sid = await state.idempotency.once(caller, key, raw, create)
    except idempotency.KeyReusedError:
        return error(422, f"Idempotency-Key {key!r} was used for another request: use a new key for a new sandbox")
    return Reply(201, sandbox_json(state, await state.manager.get(sid)))


async def _create(state: E2BState, body: dict[str, Any]) -> Reply:
    return Reply(201, sandbox_json(state, await _create_info(state, body)))


async def _create_info(state: E2BState, body: dict[str, Any]) -> SandboxInfo:
    template = body.get("templateID")
    if not isinstance(template, str) or not template:
        raise _BadRequest("templateID is required")
    if body.get("volumeMounts"):  # refused rather than ignored: the code would expect the volume's files there
        raise _BadRequest("volume mounts are not supported by this server: create the sandbox without volume_mounts")
    timeout = _int(body, "timeout", 300)
    allow = body.get("allow_internet_access", body.get("allowInternetAccess"))
    network = body.get("network") or {}
    policy = {k: network[src] for src, k in (("allowOut", "allow_out"), ("denyOut", "deny_out")) if src in network}
    kwargs: dict[str, Any] = {
        "env": _str_map(body, "envVars"),
        "metadata": _str_map(body, "metadata"),
        "timeout": timeout,
        "allow_internet_access": allow if isinstance(allow, bool) else None,
        "network": policy or None,
        **_lifecycle(body),
    }
    mgr = state.manager
    try:
        info = await mgr.create(template=_template_name(state, template), **kwargs)
    except TemplateNotFoundError:
        try:
            await mgr.get_snapshot(template)  # a snapshot id or name (Sandbox.create(snapshot_id)), as E2B allows
        except BranchboxError:
            raise TemplateNotFoundError(f"template {template!r} does not exist (nor a snapshot of that name)") from None
        info = await mgr.create(snapshot=template, **kwargs)
    return info


def _lifecycle(body: dict[str, Any]) -> dict[str, Any]:
    """``autoPause`` (the SDK's ``lifecycle.on_timeout="pause"``) and ``autoResume.enabled``. ``autoPauseMemory``
    (``mode``) is accepted and changes nothing: a container's pause (the cgroup freezer) always keeps its processes."""
    pause = body.get("autoPause", False)
    if not isinstance(pause, bool):
        raise _BadRequest(f"autoPause must be true or false, not {pause!r}")
    memory = body.get("autoPauseMemory", True)
    if not isinstance(memory, bool):
        raise _BadRequest(f"autoPauseMemory must be true or false, not {memory!r}")
    resume = body.get("autoResume") or {}
    if not isinstance(resume, dict) or not isinstance(resume.get("enabled", False), bool):
        raise _BadRequest('autoResume must be an object {"enabled": true|false}')
    return {"on_timeout": "pause" if pause else "destroy", "auto_resume": resume.get("enabled", False)}


def _template_name(state: E2BState, template: str) -> str:
    """E2B's default template is ``base``: served by a template of that name, else by branchbox's default."""
    if template == "base":
        try:
            state.manager.templates.get("base")
        except TemplateNotFoundError:
            return "default"
    return template


async def _list(state: E2BState, query: str) -> Reply:
    params = parse_qs(query)
    meta: dict[str, str] = {}
    for raw in params.get("metadata", []):
        meta.update(parse_qsl(raw, keep_blank_values=True))
    states: set[SandboxState] | None = None
    if "state" in params:
        names = {s for v in params["state"] for s in v.split(",") if s}
        bad = names - {"running", "paused"}
        if bad:
            raise _BadRequest(f"state must be running or paused, not {sorted(bad)}")
        states = {SandboxState(n) for n in names}
    else:
        states = {SandboxState.RUNNING, SandboxState.PAUSED}
    limit = _query_int(params, "limit", 100)
    if not 1 <= limit <= MAX_PAGE:
        raise _BadRequest(f"limit must be 1 to {MAX_PAGE}")
    order_asc = params.get("order", ["desc"])[0] == "asc"
    infos = await state.manager.list(metadata=meta or None, states=states)
    if "template" in params:
        infos = [i for i in infos if i.template == params["template"][0]]
    if "startedAfter" in params:
        after = _timestamp(params["startedAfter"][0])
        infos = [i for i in infos if i.created_at >= after]
    infos.sort(key=lambda i: (i.created_at, i.id), reverse=not order_asc)
    token = params.get("nextToken", [None])[0]
    if token:
        cursor = _cursor(token)
        infos = [i for i in infos if ((i.created_at, i.id) > cursor if order_asc else (i.created_at, i.id) < cursor)]
    page = infos[:limit]
    headers = {}
    if len(infos) > limit:
        last = page[-1]
        headers["x-next-token"] = f"{last.created_at!r}_{last.id}"
    return Reply(200, [listed_json(i) for i in page], headers)


def _query_int(params: dict[str, list[str]], key: str, default: int) -> int:
    raw = params.get(key, [str(default)])[0]
    if not raw.isdigit():
        raise _BadRequest(f"{key} must be a positive integer")
    return int(raw)


def _timestamp(value: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise _BadRequest(f"startedAfter must be an RFC 3339 time, not {value!r}") from None


def _cursor(token: str) -> tuple[float, str]:
    ts, _, sid = token.partition("_")
    try:
        return float(ts), sid
    except ValueError:
        raise _BadRequest("nextToken is not one this server gave out: pass the X-Next-Token of the last page") from None


def _alias(state: E2BState, name: str) -> Reply:
    """``Template.exists`` / ``alias_exists``: the daemon's templates by name (the path arrives decoded)."""
    try:
        state.manager.templates.get(_template_name(state, name))
    except BranchboxError:
        return error(404, f"template {name!r} does not exist: build it with branchbox template build")
    return Reply(200, {"templateID": name, "public": False})


async def _list_snapshots(state: E2BState, query: str) -> Reply:
    """E2B's ``SnapshotInfo`` list: the snapshots the daemon keeps (not forks' internal ones), newest first."""
    params = parse_qs(query)
    limit = _query_int(params, "limit", 100)
    if not 1 <= limit <= MAX_PAGE:
        raise _BadRequest(f"limit must be 1 to {MAX_PAGE}")
    snaps = await state.manager.list_snapshots()
    if "sandboxID" in params:
        snaps = [s for s in snaps if s.sandbox_id == params["sandboxID"][0]]
    if "name" in params:
        wanted = params["name"][0]  # E2B filters by name or id
        snaps = [s for s in snaps if wanted in (s.name, s.id)]
    snaps.sort(key=lambda s: (s.created_at, s.id), reverse=True)
    token = params.get("nextToken", [None])[0]
    if token:
        cursor = _cursor(token)
        snaps = [s for s in snaps if (s.created_at, s.id) < cursor]
    page = snaps[:limit]
    headers = {}
    if len(snaps) > limit:
        headers["x-next-token"] = f"{page[-1].created_at!r}_{page[-1].id}"
    return Reply(200, [{"snapshotID": s.id, "names": [s.name] if s.name else []} for s in page], headers)


async def _delete_snapshot(state: E2BState, id_or_name: str) -> Reply:
    """``DELETE /templates/{id}``: E2B deletes a snapshot as the template it is; here only snapshots are deleted
    (a template name is 404, so ``delete_snapshot`` answers False): templates are managed by ``branchbox template``."""
    try:
        await state.manager.delete_snapshot(id_or_name)
    except SnapshotNotFoundError:
        return error(404, f"no snapshot {id_or_name!r}: this route deletes snapshots (ids or names) only")
    return Reply(204)


async def _extend(state: E2BState, sid: str, seconds: int) -> SandboxInfo:
    """Never shortens: the sandbox lives at least ``seconds`` more (a sandbox without a time to live keeps none)."""
    info = await state.manager.get(sid)
    if info.expires_at is None:
        return info
    left = info.expires_at - time.time()
    return info if left >= seconds else await state.manager.set_timeout(sid, seconds)


async def _connect(state: E2BState, sid: str, timeout: int | None, *, resume_only: bool) -> Reply:
    mgr = state.manager
    info = await mgr.get(sid)
    status = 200
    if info.state is SandboxState.PAUSED:
        info = await mgr.resume(sid)
        status = 201
    elif resume_only:
        return error(409, f"sandbox {sid} is not paused (it is {info.state.value})")
    if timeout:
        info = await _extend(state, sid, timeout)
    return Reply(201 if resume_only else status, sandbox_json(state, info))


async def _fork(state: E2BState, sid: str, body: dict[str, Any]) -> Reply:
    count = _int(body, "count", 1) or 1
    timeout = _int(body, "timeout")
    results = await state.manager.fork(sid, count)
    out: list[dict[str, Any]] = []
    for r in results:
        if isinstance(r, SandboxInfo):
            child = await state.manager.set_timeout(r.id, timeout) if timeout else r
            out.append({"sandbox": sandbox_json(state, child)})
        else:
            out.append({"error": {"code": r.http_status, "message": r.message}})
    return Reply(201, out)
