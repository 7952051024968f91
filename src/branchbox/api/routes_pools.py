"""Warm pools: ``/v1/pools`` (statistics, live configuration). A pool is a template's on one backend: ``backend``
(a query parameter) picks it, the daemon's default backend when left out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from branchbox.api.context import Ctx
from branchbox.api.schemas import PoolResponse, PoolSettings
from branchbox.errors import NotFoundError

router = APIRouter(tags=["pools"])
Template = Annotated[str, Path(min_length=1, max_length=255, description="Template name.")]
Backend = Annotated[
    str | None,
    Query(min_length=1, max_length=64, description="The backend of the pool (default: the daemon's default)."),
]


@router.get("/v1/pools", response_model=list[PoolResponse], summary="List warm pools")
async def list_pools(ctx: Ctx) -> list[PoolResponse]:
    return [PoolResponse.of(s) for s in ctx.manager.pool_statistics()]


@router.get("/v1/pools/{template}", response_model=PoolResponse, summary="Get one warm pool")
async def get_pool(template: Template, ctx: Ctx, backend: Backend = None) -> PoolResponse:
    kind = backend or ctx.manager.settings.default_backend
    for s in ctx.manager.pool_statistics():
        if (s.template, s.backend) == (template, kind):
            return PoolResponse.of(s)
    on = "" if backend is None else f"?backend={backend}"
    raise NotFoundError(
        f"there is no warm pool for template {template!r} on backend {kind!r}: PUT /v1/pools/{template}{on} makes one"
    )


@router.put(
    "/v1/pools/{template}",
    response_model=PoolResponse,
    summary="Create or change a warm pool",
    description="Replaces the pool's settings live (fields left out take their defaults). Ready members that no "
    "longer fit (other resources, above the new target) are destroyed; missing ones boot in the background.",
)
async def put_pool(template: Template, body: PoolSettings, ctx: Ctx, backend: Backend = None) -> PoolResponse:
    stats = await ctx.manager.configure_pool(body.config(template, backend))
    ctx.log.info("pool.configured", template=template, backend=stats.backend, **body.model_dump())
    return PoolResponse.of(stats)


@router.delete("/v1/pools/{template}", status_code=204, response_class=Response, summary="Remove a warm pool")
async def delete_pool(template: Template, ctx: Ctx, backend: Backend = None) -> Response:
    await ctx.manager.remove_pool(template, backend=backend)
    ctx.log.info("pool.removed", template=template, backend=backend or ctx.manager.settings.default_backend)
    return Response(status_code=204)
