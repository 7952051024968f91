"""Snapshots, restores, forks and resets: ``/v1/snapshots``, ``/v1/sandboxes/{id}/{snapshots,fork,reset}``.

A restore is ``POST /v1/sandboxes`` with ``snapshot``. See docs/snapshots.md.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from branchbox.api.context import Ctx, SandboxId
from branchbox.api.responses import json_response
from branchbox.api.schemas import (
    CreateSnapshotRequest,
    ErrorBody,
    ForkRequest,
    ForkResponse,
    ForkResult,
    ResetRequest,
    SandboxResponse,
    SnapshotResponse,
)
from branchbox.models import SandboxInfo

router = APIRouter(tags=["snapshots"])
SnapshotRef = Annotated[str, Path(min_length=1, max_length=255, description="Snapshot id or name.")]


@router.post(
    "/v1/sandboxes/{sandbox_id}/snapshots",
    status_code=201,
    response_model=SnapshotResponse,
    summary="Snapshot a sandbox",
    description="Freezes the sandbox, captures its files into an immutable, durable snapshot, thaws it.",
)
async def create_snapshot(sandbox_id: SandboxId, body: CreateSnapshotRequest, ctx: Ctx) -> Response:
    snap = await ctx.manager.snapshot(sandbox_id, name=body.name)
    ctx.log.info("snapshot.created", snapshot_id=snap.id, name=snap.name, total_ms=snap.timings.get("total"))
    return json_response(SnapshotResponse.of(snap), status_code=201)


@router.get("/v1/snapshots", response_model=list[SnapshotResponse], summary="List snapshots")
async def list_snapshots(ctx: Ctx) -> list[SnapshotResponse]:
    return [SnapshotResponse.of(s) for s in await ctx.manager.list_snapshots()]


@router.get("/v1/snapshots/{snapshot}", response_model=SnapshotResponse, summary="Get one snapshot")
async def get_snapshot(snapshot: SnapshotRef, ctx: Ctx) -> SnapshotResponse:
    return SnapshotResponse.of(await ctx.manager.get_snapshot(snapshot))


@router.delete(
    "/v1/snapshots/{snapshot}",
    status_code=204,
    response_class=Response,
    summary="Delete a snapshot",
    description="Sandboxes restored or forked from it keep working; its layers go once nothing uses them.",
)
async def delete_snapshot(snapshot: SnapshotRef, ctx: Ctx) -> Response:
    await ctx.manager.delete_snapshot(snapshot)
    ctx.log.info("snapshot.deleted", snapshot=snapshot)
    return Response(status_code=204)


@router.post(
    "/v1/sandboxes/{sandbox_id}/fork",
    response_model=ForkResponse,
    summary="Fork a sandbox",
    description="`count` new sandboxes continuing from its current files (container backend: processes are not "
    "copied). One result per child, in order: a sandbox or the error that child met.",
)
async def fork(sandbox_id: SandboxId, body: ForkRequest, ctx: Ctx) -> ForkResponse:
    results = await ctx.manager.fork(sandbox_id, body.count)
    out = [
        ForkResult(sandbox=SandboxResponse.of(r))
        if isinstance(r, SandboxInfo)
        else ForkResult(error=ErrorBody(**r.to_dict()))
        for r in results
    ]
    ctx.log.info("sandbox.forked", count=body.count, failed=sum(r.error is not None for r in out))
    return ForkResponse(results=out)


@router.post(
    "/v1/sandboxes/{sandbox_id}/reset",
    response_model=SandboxResponse,
    summary="Reset a sandbox",
    description="Back to its template (or to `snapshot`), keeping its id, hostname, env and metadata.",
)
async def reset(sandbox_id: SandboxId, body: ResetRequest, ctx: Ctx) -> SandboxResponse:
    return SandboxResponse.of(await ctx.manager.reset(sandbox_id, body.snapshot))
