"""Request building and response parsing shared by Sandbox and AsyncSandbox. No I/O here."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from branchbox.sdk._errors import SandboxError, error_for
from branchbox.sdk._models import FilesystemEvent

Param = str | int | float | bool | None
COMMAND_GRACE_S = 10.0  # an HTTP run waits this much longer than the command's own timeout


@dataclass(frozen=True, slots=True)
class Req:
    """One HTTP request to make. ``timeout`` None means no limit; ``use_default`` keeps the client's."""

    method: str
    path: str
    params: list[tuple[str, Param]] = field(default_factory=list)
    json: Any = None
    use_default_timeout: bool = True
    timeout: float | None = None


def _sbx(sandbox_id: str) -> str:
    if not sandbox_id:
        raise ValueError("sandbox_id must not be empty")
    return "/v1/sandboxes/" + quote(sandbox_id, safe="")


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def create_sandbox(
    *,
    template: str,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
    envs: Mapping[str, str] | None,
    cpu: float | None,
    memory_mb: int | None,
    pids: int | None,
    backend: str | None,
    hostname: str | None,
    snapshot: str | None = None,
    disk_mb: int | None = None,
    allow_internet_access: bool | None = None,
    network: Mapping[str, Any] | None = None,
    on_timeout: str | None = None,
    auto_resume: bool | None = None,
) -> Req:
    body = _drop_none(
        {
            "template": template,
            "timeout": timeout,
            "metadata": dict(metadata) if metadata is not None else None,
            "envs": dict(envs) if envs is not None else None,
            "cpu": cpu,
            "memory_mb": memory_mb,
            "pids": pids,
            "disk_mb": disk_mb,
            "backend": backend,
            "hostname": hostname,
            "snapshot": snapshot,
            "allow_internet_access": allow_internet_access,
            "network": dict(network) if network is not None else None,
            "on_timeout": on_timeout,
            "auto_resume": auto_resume,
        }
    )
    if snapshot is not None and template == "default":
        body.pop("template")  # a restore takes the snapshot's template
    return Req("POST", "/v1/sandboxes", json=body)


def get_network(sandbox_id: str) -> Req:
    return Req("GET", _sbx(sandbox_id) + "/network")


def update_network(sandbox_id: str, patch: Mapping[str, Any]) -> Req:
    """Keys given replace the current values (allow_out, deny_out, allow_internet_access); absent keys stay."""
    return Req("PATCH", _sbx(sandbox_id) + "/network", json=dict(patch))


def host_url(base_url: str, sandbox_id: str, port: int, token: str | None) -> str:
    """The daemon URL that reaches ``port`` inside the sandbox (HTTP; ws:// for WebSocket on the same path)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, not {port!r}")
    url = f"{base_url.rstrip('/')}{_sbx(sandbox_id)}/ports/{port}/"
    return url + (f"?bb_token={quote(token, safe='')}" if token else "")


def get_sandbox(sandbox_id: str) -> Req:
    return Req("GET", _sbx(sandbox_id))


def list_sandboxes(*, metadata: Mapping[str, str] | None, state: Iterable[str] | None) -> Req:
    params: list[tuple[str, Param]] = [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]
    params += [("state", s) for s in (state or ())]
    return Req("GET", "/v1/sandboxes", params=params)


def kill_sandbox(sandbox_id: str) -> Req:
    return Req("DELETE", _sbx(sandbox_id))


def set_timeout(sandbox_id: str, timeout: float | None) -> Req:
    return Req("POST", _sbx(sandbox_id) + "/timeout", json={"timeout": timeout})


def pause(sandbox_id: str) -> Req:
    return Req("POST", _sbx(sandbox_id) + "/pause")


def resume(sandbox_id: str) -> Req:
    return Req("POST", _sbx(sandbox_id) + "/resume")


def run_command(
    sandbox_id: str,
    cmd: str | Sequence[str],
    *,
    background: bool,
    envs: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    stdin: str | None,
    timeout: float | None,
    tag: str | None,
    request_timeout: float | None,
    max_output: int | None = None,
) -> Req:
    body = _drop_none(
        {
            "cmd": cmd if isinstance(cmd, str) else list(cmd),
            "envs": dict(envs) if envs is not None else None,
            "cwd": cwd,
            "user": user,
            "stdin": stdin,
            "timeout": timeout,
            "tag": tag,
            "max_output": max_output,
        }
    )
    if background:
        body["background"] = True
        return Req("POST", _sbx(sandbox_id) + "/commands", json=body)
    # the request must outlive the command: no limit when the command has none
    http_timeout = None if timeout is None else timeout + max(COMMAND_GRACE_S, request_timeout or 0.0)
    return Req("POST", _sbx(sandbox_id) + "/commands", json=body, use_default_timeout=False, timeout=http_timeout)


def list_commands(sandbox_id: str) -> Req:
    return Req("GET", _sbx(sandbox_id) + "/commands")


def kill_command(sandbox_id: str, pid: int, signal: int) -> Req:
    return Req("POST", f"{_sbx(sandbox_id)}/commands/{int(pid)}/kill", json={"signal": signal})


def read_file(sandbox_id: str, path: str, max_size: int | None = None) -> Req:
    params: list[tuple[str, Param]] = [("path", path)]
    if max_size is not None:
        params.append(("max_size", max_size))
    return Req("GET", _sbx(sandbox_id) + "/files", params=params)


def write_file(sandbox_id: str, path: str, mode: int | None) -> Req:
    params: list[tuple[str, Param]] = [("path", path)]
    if mode is not None:
        params.append(("mode", str(mode)))
    return Req("PUT", _sbx(sandbox_id) + "/files", params=params)


def read_archive(sandbox_id: str, path: str) -> Req:
    return Req("GET", _sbx(sandbox_id) + "/files/archive", params=[("path", path)])


def write_archive(sandbox_id: str, path: str) -> Req:
    return Req("PUT", _sbx(sandbox_id) + "/files/archive", params=[("path", path)])


def list_files(sandbox_id: str, path: str, depth: int) -> Req:
    return Req("GET", _sbx(sandbox_id) + "/files/list", params=[("path", path), ("depth", str(depth))])


def stat(sandbox_id: str, path: str) -> Req:
    return Req("GET", _sbx(sandbox_id) + "/files/stat", params=[("path", path)])


def mkdir(sandbox_id: str, path: str) -> Req:
    return Req("POST", _sbx(sandbox_id) + "/files/mkdir", json={"path": path})


def remove(sandbox_id: str, path: str, recursive: bool) -> Req:
    return Req("DELETE", _sbx(sandbox_id) + "/files", params=[("path", path), ("recursive", str(recursive).lower())])


def rename(sandbox_id: str, src: str, dst: str) -> Req:
    return Req("POST", _sbx(sandbox_id) + "/files/rename", json={"src": src, "dst": dst})


WATCH_TYPES = frozenset({"create", "write", "remove", "rename", "chmod"})


def watch_path(sandbox_id: str) -> str:
    """The WebSocket of a directory watch."""
    return _sbx(sandbox_id) + "/files/watch"


def watch_query(path: str, recursive: bool) -> str:
    return urlencode({"path": path, "recursive": str(recursive).lower()})


def watch_message(raw: str | bytes) -> FilesystemEvent | str:
    """One message of a watch socket: an event, or ``started`` / ``end`` (the directory was removed); an error
    message raises its error."""
    msg = json.loads(raw)
    kind = msg.get("type", "") if isinstance(msg, dict) else ""
    if kind in ("started", "end"):
        return str(kind)
    if kind == "error":
        err = msg.get("error") or {}
        raise error_for(str(err.get("code", "internal")), str(err.get("message", "watch error")))
    if kind == "overflow":
        return FilesystemEvent("overflow", "", reason=str(msg.get("reason", "")))
    if kind in WATCH_TYPES and isinstance(msg.get("name"), str):
        return FilesystemEvent(kind, msg["name"], is_dir=msg.get("is_dir") is True)
    raise SandboxError(f"unexpected message from the daemon: {msg!r}")


def list_templates() -> Req:
    return Req("GET", "/v1/templates")


def build_template(name: str, dockerfile: str, build_args: Mapping[str, str] | None) -> Req:
    """A Dockerfile build (the body: the context tar); no time limit: a build runs as long as its steps."""
    if not name:
        raise ValueError("name must not be empty")
    params: list[tuple[str, Param]] = [("name", name), ("dockerfile", dockerfile)]
    params += [("build_arg", f"{k}={v}") for k, v in (build_args or {}).items()]
    return Req("POST", "/v1/templates", params=params, use_default_timeout=False, timeout=None)


def import_template(reference: str, name: str, *, username: str | None, password: str | None, insecure: bool) -> Req:
    """An image import from a registry (docker://...); no time limit: a large image takes a while."""
    if not name:
        raise ValueError("name must not be empty")
    body: dict[str, Any] = {"reference": reference, "name": name, "insecure": insecure}
    if username is not None or password is not None:
        body.update(username=username, password=password)
    return Req("POST", "/v1/templates/import", json=body, use_default_timeout=False, timeout=None)


def build_event(line: bytes) -> dict[str, Any]:
    """One line of a build log; an ``error`` event raises its SDK exception."""
    try:
        event = json.loads(line)
    except ValueError:
        raise SandboxError(f"the build log has a line that is not JSON: {line[:200]!r}", code="internal") from None
    if not isinstance(event, dict):
        raise SandboxError(f"the build log has a line that is not an object: {line[:200]!r}", code="internal")
    if event.get("type") == "error":
        err = event.get("error") or {}
        raise error_for(str(err.get("code", "internal")), str(err.get("message", "build failed")),
                        details=err.get("details"))  # fmt: skip
    return event


def _pool(template: str) -> str:
    if not template:
        raise ValueError("template must not be empty")
    return "/v1/pools/" + quote(template, safe="")


def list_pools() -> Req:
    return Req("GET", "/v1/pools")


def _on(backend: str | None) -> list[tuple[str, Param]]:
    return [] if backend is None else [("backend", backend)]


def get_pool(template: str, backend: str | None = None) -> Req:
    return Req("GET", _pool(template), params=_on(backend))


def configure_pool(template: str, settings: Mapping[str, Any], backend: str | None = None) -> Req:
    """PUT semantics: settings left out (None) take the daemon's defaults."""
    return Req("PUT", _pool(template), json=_drop_none(settings), params=_on(backend))


def remove_pool(template: str, backend: str | None = None) -> Req:
    return Req("DELETE", _pool(template), params=_on(backend))


def _snap(ref: str) -> str:
    if not ref:
        raise ValueError("snapshot id or name must not be empty")
    return "/v1/snapshots/" + quote(ref, safe="")


def create_snapshot(sandbox_id: str, name: str | None) -> Req:
    return Req("POST", _sbx(sandbox_id) + "/snapshots", json=_drop_none({"name": name}))


def list_snapshots() -> Req:
    return Req("GET", "/v1/snapshots")


def get_snapshot(ref: str) -> Req:
    return Req("GET", _snap(ref))


def delete_snapshot(ref: str) -> Req:
    return Req("DELETE", _snap(ref))


def fork(sandbox_id: str, count: int) -> Req:
    return Req("POST", _sbx(sandbox_id) + "/fork", json={"count": count})


def reset(sandbox_id: str, snapshot: str | None) -> Req:
    return Req("POST", _sbx(sandbox_id) + "/reset", json=_drop_none({"snapshot": snapshot}))


def parse_fork(body: Any) -> list[dict[str, Any] | SandboxError]:
    """One entry per child: the sandbox's JSON, or the SDK exception for the error that child met."""
    out: list[dict[str, Any] | SandboxError] = []
    for r in body["results"]:
        if r.get("sandbox") is not None:
            out.append(r["sandbox"])
        else:
            err = r.get("error") or {}
            out.append(error_for(str(err.get("code", "internal")), str(err.get("message", "fork failed"))))
    return out


def health() -> Req:
    return Req("GET", "/health")


# ---------------------------------------------------------------- responses


def raise_for_status(status: int, body: bytes) -> None:
    """Raise the SDK exception for an error response (the ``error.code`` picks the class)."""
    if status < 400:
        return
    code, message, details = "internal", f"HTTP {status}", None
    try:
        err = json.loads(body)["error"]
        code, message, details = str(err["code"]), str(err["message"]), err.get("details")
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode("utf-8", "replace").strip()
        message = f"HTTP {status} with a non-JSON body: {text!r} (is BRANCHBOX_URL a branchbox daemon?)"
    raise error_for(code, message, status=status, details=details)


# ---------------------------------------------------------------- WebSocket frames


def stream_start(
    cmd: str | Sequence[str],
    *,
    envs: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    tag: str | None,
    stdin: bool,
) -> str:
    return json.dumps(
        _drop_none(
            {
                "cmd": cmd if isinstance(cmd, str) else list(cmd),
                "envs": dict(envs) if envs is not None else None,
                "cwd": cwd,
                "user": user,
                "timeout": timeout,
                "tag": tag,
                "stdin": stdin,
            }
        )
    )


def pty_start(
    *,
    cols: int,
    rows: int,
    cmd: str | Sequence[str] | None,
    envs: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
) -> str:
    body = _drop_none(
        {
            "cols": cols,
            "rows": rows,
            "cmd": None if cmd is None else (cmd if isinstance(cmd, str) else list(cmd)),
            "envs": dict(envs) if envs is not None else None,
            "cwd": cwd,
            "user": user,
            "timeout": timeout,
        }
    )
    return json.dumps(body)


def stdin_frame(data: str | bytes, *, binary: bool) -> str:
    if binary:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return json.dumps({"type": "stdin", "data": base64.b64encode(raw).decode("ascii")})
    text = data if isinstance(data, str) else data.decode("utf-8")
    return json.dumps({"type": "stdin", "data": text})


def resize_frame(cols: int, rows: int) -> str:
    return json.dumps({"type": "resize", "cols": cols, "rows": rows})


def kill_frame(signal: int) -> str:
    return json.dumps({"type": "kill", "signal": signal})


CLOSE_STDIN = json.dumps({"type": "close_stdin"})


@dataclass(frozen=True, slots=True)
class Event:
    """One server message: kind is started, stdout, stderr, exit or error."""

    kind: str
    text: str = ""
    data: bytes = b""
    pid: int = 0
    exit_code: int = 0
    signal: int | None = None
    error: SandboxError | None = None


def parse_event(raw: str | bytes, *, binary: bool) -> Event:
    msg = json.loads(raw)
    kind = msg.get("type", "")
    if kind in ("stdout", "stderr"):
        if binary:
            data = base64.b64decode(msg.get("data", ""))
            return Event(kind, text=data.decode("utf-8", "replace"), data=data)
        text = msg.get("data", "")
        return Event(kind, text=text, data=text.encode("utf-8"))
    if kind == "started":
        return Event(kind, pid=int(msg["pid"]))
    if kind == "exit":
        return Event(kind, exit_code=int(msg["exit_code"]), signal=msg.get("signal"))
    if kind == "error":
        err = msg.get("error") or {}
        exc = error_for(str(err.get("code", "internal")), str(err.get("message", "stream error")))
        return Event(kind, error=exc)
    raise SandboxError(f"unexpected message from the daemon: {msg!r}")


def ws_close_error(code: int | None, reason: str) -> SandboxError:
    """The error for a socket closed before an exit message."""
    if code is not None and 4000 <= code < 5000:
        return error_for(reason or "internal", f"stream closed by the daemon ({reason})", status=code - 4000)
    return error_for("agent_disconnected", f"stream closed before the process exited (close code {code})")
