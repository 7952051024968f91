"""Commands over plain HTTP: run (wait for the result or start in the background), list, kill."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.responses import StreamingResponse

from branchbox.api.context import AppContext, Ctx, SandboxId
from branchbox.api.responses import json_response
from branchbox.api.run_json import StreamedJson, command_result
from branchbox.api.schemas import (
    BackgroundCommand,
    CommandResult,
    KillRequest,
    ProcessResponse,
    RunCommandRequest,
)
from branchbox.errors import BadRequestError

router = APIRouter(tags=["commands"])


@router.post(
    "/v1/sandboxes/{sandbox_id}/commands",
    response_model=CommandResult | BackgroundCommand,
    summary="Run a command",
    description="Waits for the exit and returns the output, or with background=true returns the pid at once. "
    "A non-zero exit is a result, not an error.",
)
async def run_command(sandbox_id: SandboxId, body: RunCommandRequest, ctx: Ctx) -> Response:
    if body.background:
        if body.stdin is not None:
            raise BadRequestError("stdin= is not allowed with background=true: use the commands/stream WebSocket")
        handle = await ctx.manager.spawn(
            sandbox_id,
            body.cmd,
            env=body.envs,
            cwd=body.cwd,
            user=body.user,
            tag=body.tag,
            timeout=body.timeout,
        )
        pid = handle.pid
        await handle.detach()
        ctx.log.info("command.started", pid=pid)
        return json_response(BackgroundCommand(pid=pid))
    answer = await run_foreground(ctx, sandbox_id, body)
    if isinstance(answer, StreamedJson):
        return StreamingResponse(
            answer.parts(), media_type="application/json", headers={"content-length": str(answer.length)}
        )
    return json_response(answer)


async def run_foreground(ctx: AppContext, sandbox_id: str, body: RunCommandRequest) -> CommandResult | StreamedJson:
    """Run a command to its exit (shared with the fast path in :mod:`branchbox.api.fastpath`); a large result
    comes as its JSON body in parts (:mod:`branchbox.api.run_json`)."""
    result = await ctx.manager.exec(
        sandbox_id,
        body.cmd,
        env=body.envs,
        cwd=body.cwd,
        user=body.user,
        stdin=None if body.stdin is None else body.stdin.encode("utf-8"),
        timeout=body.timeout,
        max_output=body.max_output,
    )
    return await command_result(result)


@router.get("/v1/sandboxes/{sandbox_id}/commands", response_model=list[ProcessResponse], summary="List processes")
async def list_commands(sandbox_id: SandboxId, ctx: Ctx) -> list[ProcessResponse]:
    return [ProcessResponse.of(p) for p in await ctx.manager.list_processes(sandbox_id)]


@router.post(
    "/v1/sandboxes/{sandbox_id}/commands/{pid}/kill",
    status_code=204,
    response_class=Response,
    summary="Send a signal to a process",
)
async def kill_command(sandbox_id: SandboxId, pid: int, ctx: Ctx, body: KillRequest | None = None) -> Response:
    await ctx.manager.kill_process(sandbox_id, pid, (body or KillRequest()).signal)
    return Response(status_code=204)
