"""Template imports from a registry: ``POST /v1/templates/import`` -> an NDJSON progress log (docs/templates.md).

Only ``docker://`` references: the other transports read the daemon host's files or its Docker daemon, which an
API caller has no business reaching (the CLI imports those on the host). The registry's name is resolved and every
address checked against the ranges sandboxes cannot reach (loopback, private, link-local/metadata, the host's own
addresses), unless the operator allows a range with ``git_allow_cidrs`` (the same list as git remotes): a request
cannot make the daemon's host probe its own network. (skopeo resolves the name again itself: a DNS answer that
changes in between is not pinned, unlike git's.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from branchbox.api.context import Ctx
from branchbox.api.schemas import TemplateResponse
from branchbox.errors import BranchboxError, ImageReferenceError, RegistryUnreachableError
from branchbox.images.build import BuildEvent
from branchbox.images.oci_fetch import FetchOptions, ImageRef, parse_ref
from branchbox.images.oci_unpack import Budget
from branchbox.workspaces.egress import blocked

router = APIRouter(tags=["templates"])

_NDJSON: dict[str, Any] = {"application/x-ndjson": {"schema": {"type": "string"}}}
_DESCRIPTION = """\
Imports a container image from a registry as template `name` (docs/templates.md, "Importing a container image").
The answer is a stream of JSON objects, one per line (`application/x-ndjson`):

* `{"type": "progress", "step": "fetch|verify|unpack|cached", "message": "...", "fraction": F}` as it goes
  (one `unpack` message per layer, `cached` for a layer or an image imported before),
* `{"type": "done", "template": {...}}` at the end,
* or, last, `{"type": "error", "error": {"code", "message", "details"}}`: the import failed and left nothing.

Errors found before the import starts (a bad reference or name, a registry in a blocked range) are plain JSON
errors with their HTTP status."""


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str = Field(max_length=1024, description="docker://[HOST[:PORT]/]REPO[:TAG|@sha256:...]")
    name: str = Field(max_length=63, description="Template name.")
    username: str | None = Field(default=None, max_length=256, description="Registry user (with password).")
    password: str | None = Field(default=None, max_length=4096, description="Registry password or token.")
    insecure: bool = Field(default=False, description="Plain HTTP or unverified TLS to the registry.")
    max_size_mb: int = Field(default=16384, ge=1, le=1 << 20, description="Refuse images unpacking to more.")
    max_files: int = Field(default=1_000_000, ge=1, le=10_000_000, description="Refuse images with more entries.")


async def check_registry(ref: ImageRef, allow: tuple[str, ...]) -> None:
    host, _, port = ref.registry.rpartition(":") if ref.registry.count(":") == 1 else (ref.registry, "", "")
    host = host or ref.registry
    if ref.registry == "docker.io":
        host = "registry-1.docker.io"
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addrs = [literal]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port or 443), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise RegistryUnreachableError(f"cannot resolve the registry {host!r}: {exc}") from exc
        addrs = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
    for addr in addrs:
        why = blocked(addr, allow)
        if why is not None:
            raise ImageReferenceError(
                f"the registry {host!r} resolves to {addr}, {why}: the daemon does not import from there; an "
                "operator may allow the range with git_allow_cidrs (BRANCHBOX_GIT_ALLOW_CIDRS), or import on the "
                "host with `branchbox template import-image`",
                host=host,
            )


@router.post(
    "/v1/templates/import",
    response_class=StreamingResponse,
    responses={200: {"content": _NDJSON, "description": "The import's progress, one JSON object per line."}},
    summary="Import a template from a container image in a registry",
    description=_DESCRIPTION,
)
async def import_template(body: ImportRequest, ctx: Ctx) -> StreamingResponse:
    ref = parse_ref(body.reference)
    if ref.transport != "docker":
        raise ImageReferenceError(
            f"the API imports from registries only (docker://...), not {ref.transport}:; import archives, layouts "
            "and a local Docker daemon's images on the host with `branchbox template import-image`",
            reference=body.reference[:200],
        )
    if (body.username is None) != (body.password is None):
        raise ImageReferenceError("give username and password together (or neither, for an anonymous pull)")
    await check_registry(ref, ctx.manager.settings.workspaces.allow_cidrs)
    creds = None if body.username is None else f"{body.username}:{body.password}"
    opts = FetchOptions(creds=creds, tls_verify=not body.insecure)
    budget = Budget(max_bytes=body.max_size_mb << 20, max_files=body.max_files)
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def progress(ev: BuildEvent) -> None:  # also called from the unpacking thread
        event = {"type": "progress", "step": ev.step, "message": ev.message, "fraction": ev.fraction}
        loop.call_soon_threadsafe(queue.put_nowait, event)

    async def work() -> None:
        try:
            info = await ctx.manager.templates.import_image(
                body.reference, name=body.name, progress=progress, options=opts, budget=budget
            )
            ctx.log.info("template_imported", template=info.name, digest=info.digest)
            queue.put_nowait({"type": "done", "template": TemplateResponse.of(info).model_dump(mode="json")})
        except BranchboxError as exc:
            queue.put_nowait({"type": "error", "error": exc.to_dict()})
        except Exception as exc:
            ctx.log.exception("template_import_crashed")
            queue.put_nowait({"type": "error", "error": {"code": "internal", "message": f"import failed: {exc}"}})
        finally:
            queue.put_nowait(None)

    task = loop.create_task(work())

    async def stream() -> AsyncIterator[bytes]:
        try:
            while (event := await queue.get()) is not None:
                yield (json.dumps(event, separators=(",", ":")) + "\n").encode()
        finally:
            if not task.done():  # the client went away: stop the import (its temp dir goes with it)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    return StreamingResponse(stream(), media_type="application/x-ndjson")
