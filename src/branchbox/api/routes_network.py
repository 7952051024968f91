"""A sandbox's network: ``/v1/sandboxes/{id}/network`` (address, egress policy; live changes)."""

from __future__ import annotations

from fastapi import APIRouter

from branchbox.api.context import AppContext, Ctx, SandboxId
from branchbox.api.schemas import NetworkResponse, NetworkUpdateRequest
from branchbox.net import Attachment

router = APIRouter(tags=["network"])


def _response(ctx: AppContext, att: Attachment) -> NetworkResponse:
    policy = att.policy.as_dict()
    return NetworkResponse(address=att.address, port_token=ctx.port_tokens.token(att.sandbox_id), **policy)


@router.get("/v1/sandboxes/{sandbox_id}/network", response_model=NetworkResponse, summary="Network of a sandbox")
async def get_network(sandbox_id: SandboxId, ctx: Ctx) -> NetworkResponse:
    return _response(ctx, await ctx.manager.get_network(sandbox_id))


@router.patch(
    "/v1/sandboxes/{sandbox_id}/network", response_model=NetworkResponse, summary="Change some egress settings"
)
async def patch_network(sandbox_id: SandboxId, body: NetworkUpdateRequest, ctx: Ctx) -> NetworkResponse:
    """Keys present replace the current value; absent keys stay. Applies at once, to open connections too."""
    return _response(ctx, await ctx.manager.update_network(sandbox_id, body.model_dump(exclude_none=True)))


@router.put("/v1/sandboxes/{sandbox_id}/network", response_model=NetworkResponse, summary="Replace the egress policy")
async def put_network(sandbox_id: SandboxId, body: NetworkUpdateRequest, ctx: Ctx) -> NetworkResponse:
    """Absent keys take their defaults (internet allowed, empty lists)."""
    patch = {
        "allow_internet_access": True if body.allow_internet_access is None else body.allow_internet_access,
        "allow_out": body.allow_out or [],
        "deny_out": body.deny_out or [],
    }
    return _response(ctx, await ctx.manager.update_network(sandbox_id, patch))
