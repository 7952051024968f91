"""Sandbox lifecycle and templates: ``/v1/sandboxes``, ``/v1/templates``."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote

import structlog
from fastapi import APIRouter, Query, Response

from branchbox.api.context import AppContext, Ctx, SandboxId
from branchbox.api.responses import json_response
from branchbox.api.schemas import CreateSandboxRequest, SandboxResponse, TemplateResponse, TimeoutRequest
from branchbox.errors import BadRequestError
from branchbox.models import SandboxState

router = APIRouter(tags=["sandboxes"])


def parse_metadata_filter(values: list[str]) -> dict[str, str]:
    """``?metadata=k=v&metadata=k2=v2`` or E2B's single ``?metadata=k%3Dv%26k2%3Dv2``; all must match."""
    out: dict[str, str] = {}
    for value in values:
        for pair in value.split("&"):
            if not pair:
                continue
            key, sep, val = pair.partition("=")
            if not sep or not key:
                raise BadRequestError(f"metadata filter {pair!r} is not key=value: pass ?metadata=key=value")
            out[unquote(key)] = unquote(val)
    return out


@router.post("/v1/sandboxes", status_code=201, response_model=SandboxResponse, summary="Create a sandbox")
async def create_sandbox(body: CreateSandboxRequest, ctx: Ctx) -> Response:
    created = await create(ctx, body)
    log_created(ctx, created)
    return json_response(created, status_code=201)


async def create(ctx: AppContext, body: CreateSandboxRequest) -> SandboxResponse:
    """Create a sandbox (shared with the fast path in :mod:`branchbox.api.fastpath`)."""
    info = await ctx.manager.create(
        template=body.template,
        env=body.envs,
        timeout=body.timeout,
        cpu=body.cpu,
        memory_mb=body.memory_mb,
        pids=body.pids,
        disk_mb=body.disk_mb,
        metadata=body.metadata,
        backend=body.backend,
        hostname=body.hostname,
        snapshot=body.snapshot,
        allow_internet_access=body.allow_internet_access,
        network=None if body.network is None else body.network.model_dump(exclude_none=True),
        on_timeout=body.on_timeout,
        auto_resume=body.auto_resume,
    )
    return SandboxResponse.of(info)


def log_created(ctx: AppContext, created: SandboxResponse) -> None:
    """The log lines of a create (the fast path writes them after the response, off the client's wait)."""
    structlog.contextvars.bind_contextvars(sandbox_id=created.sandbox_id)
    log = ctx.log.bind(backend=created.backend, source=created.source)
    log.info("sandbox.created", template=created.template_id, total_ms=created.timings.get("total"))
    log.debug("sandbox.create_timings", timings=created.timings)


@router.get("/v1/sandboxes", response_model=list[SandboxResponse], summary="List sandboxes")
async def list_sandboxes(
    ctx: Ctx,
    metadata: Annotated[
        list[str] | None, Query(description="key=value pairs that must all match (repeat or join with &).")
    ] = None,
    state: Annotated[list[SandboxState] | None, Query(description="Only these states (repeatable).")] = None,
) -> list[SandboxResponse]:
    filt = parse_metadata_filter(metadata or [])
    infos = await ctx.manager.list(metadata=filt or None, states=state or None)
    return [SandboxResponse.of(i) for i in infos]


@router.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxResponse, summary="Get one sandbox")
async def get_sandbox(sandbox_id: SandboxId, ctx: Ctx) -> Response:
    return json_response(SandboxResponse.of(await ctx.manager.get(sandbox_id)))


@router.delete("/v1/sandboxes/{sandbox_id}", status_code=204, response_class=Response, summary="Destroy a sandbox")
async def destroy_sandbox(sandbox_id: SandboxId, ctx: Ctx) -> Response:
    await ctx.manager.destroy(sandbox_id)
    ctx.log.info("sandbox.destroyed")
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/timeout", response_model=SandboxResponse, summary="Set the timeout")
async def set_timeout(sandbox_id: SandboxId, body: TimeoutRequest, ctx: Ctx) -> SandboxResponse:
    return SandboxResponse.of(await ctx.manager.set_timeout(sandbox_id, body.timeout))


@router.post("/v1/sandboxes/{sandbox_id}/pause", response_model=SandboxResponse, summary="Pause (freeze)")
async def pause(sandbox_id: SandboxId, ctx: Ctx) -> SandboxResponse:
    return SandboxResponse.of(await ctx.manager.pause(sandbox_id))


@router.post("/v1/sandboxes/{sandbox_id}/resume", response_model=SandboxResponse, summary="Resume (thaw)")
async def resume(sandbox_id: SandboxId, ctx: Ctx) -> SandboxResponse:
    return SandboxResponse.of(await ctx.manager.resume(sandbox_id))


@router.get("/v1/templates", response_model=list[TemplateResponse], tags=["templates"], summary="List templates")
async def list_templates(ctx: Ctx) -> list[TemplateResponse]:
    return [TemplateResponse.of(t) for t in await ctx.manager.list_templates()]
