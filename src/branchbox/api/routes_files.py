"""Files inside a sandbox. Upload and download bodies are streamed (application/octet-stream) both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from branchbox.api.context import Ctx, SandboxId
from branchbox.api.schemas import ArchiveResponse, FileEntryResponse, PathRequest, RenameRequest
from branchbox.limits import MAX_PATH_BYTES

router = APIRouter(tags=["files"])

PathQuery = Annotated[
    str, Query(min_length=1, max_length=MAX_PATH_BYTES - 1, description="Absolute path inside the sandbox.")
]
_BINARY: dict[str, Any] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_TAR: dict[str, Any] = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}


@router.get(
    "/v1/sandboxes/{sandbox_id}/files",
    response_class=StreamingResponse,
    responses={200: {"content": _BINARY, "description": "The file's bytes, streamed."}},
    summary="Download a file",
)
async def download(
    sandbox_id: SandboxId,
    path: PathQuery,
    ctx: Ctx,
    max_size: Annotated[
        int | None,
        Query(ge=0, description="Refuse (413 payload_too_large, before any byte) a file larger than this."),
    ] = None,
) -> StreamingResponse:
    await ctx.manager.awake(sandbox_id)
    return await _streamed(ctx.manager.download(sandbox_id, path, max_size=max_size), "application/octet-stream")


@router.get(
    "/v1/sandboxes/{sandbox_id}/files/archive",
    response_class=StreamingResponse,
    responses={200: {"content": _TAR, "description": "A tar (pax) of the path, streamed."}},
    summary="Download a directory (or a file) as a tar",
    description="A directory's contents, named relative to it (as `tar -C DIR -c .`), or one file under its own "
    "name. Symlinks are archived as links; sockets and devices are left out.",
)
async def download_archive(sandbox_id: SandboxId, path: PathQuery, ctx: Ctx) -> StreamingResponse:
    await ctx.manager.awake(sandbox_id)
    return await _streamed(ctx.manager.download_archive(sandbox_id, path), "application/x-tar")


async def _streamed(source: AsyncIterator[bytes], media_type: str) -> StreamingResponse:
    chunks = aiter(source)
    try:
        first = await anext(chunks)  # errors (missing file, a directory) surface before the 200 is sent
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)  # an async generator: stop the agent-side transfer too
            if aclose is not None:
                await aclose()

    return StreamingResponse(body(), media_type=media_type)


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


@router.put(
    "/v1/sandboxes/{sandbox_id}/files",
    response_model=FileEntryResponse,
    openapi_extra={"requestBody": {"required": True, "content": _BINARY}},
    summary="Upload a file (streamed body; parent directories are created)",
)
async def upload(
    sandbox_id: SandboxId,
    path: PathQuery,
    request: Request,
    ctx: Ctx,
    mode: Annotated[int | None, Query(ge=0, le=0o7777, description="Permission bits, e.g. 420 for 0o644.")] = None,
) -> FileEntryResponse:
    return FileEntryResponse.of(await ctx.manager.upload(sandbox_id, path, _body(request), mode=mode))


@router.put(
    "/v1/sandboxes/{sandbox_id}/files/archive",
    response_model=ArchiveResponse,
    openapi_extra={"requestBody": {"required": True, "content": _TAR}},
    summary="Upload a tar and unpack it into a directory",
    description="The body is an uncompressed tar (ustar, pax or GNU), unpacked as it streams into `path` "
    "(created with its parents; existing files replaced, directories merged). Member names may not climb out of "
    "`path`. Owners are not kept (files belong to root); modes and times are. Not atomic: on an error the members "
    "before the bad one stay.",
)
async def upload_archive(sandbox_id: SandboxId, path: PathQuery, request: Request, ctx: Ctx) -> ArchiveResponse:
    return ArchiveResponse.of(await ctx.manager.upload_archive(sandbox_id, path, _body(request)))


@router.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, response_class=Response, summary="Remove")
async def remove(
    sandbox_id: SandboxId,
    path: PathQuery,
    ctx: Ctx,
    recursive: Annotated[bool, Query(description="Remove a directory and everything in it.")] = False,
) -> Response:
    await ctx.manager.remove(sandbox_id, path, recursive=recursive)
    return Response(status_code=204)


@router.get(
    "/v1/sandboxes/{sandbox_id}/files/list",
    response_model=list[FileEntryResponse],
    summary="List a directory",
)
async def list_files(
    sandbox_id: SandboxId,
    path: PathQuery,
    ctx: Ctx,
    depth: Annotated[int, Query(ge=1, le=32)] = 1,
) -> list[FileEntryResponse]:
    return [FileEntryResponse.of(e) for e in await ctx.manager.list_files(sandbox_id, path, depth=depth)]


@router.get("/v1/sandboxes/{sandbox_id}/files/stat", response_model=FileEntryResponse, summary="Stat a path")
async def stat(sandbox_id: SandboxId, path: PathQuery, ctx: Ctx) -> FileEntryResponse:
    return FileEntryResponse.of(await ctx.manager.stat(sandbox_id, path))


@router.post(
    "/v1/sandboxes/{sandbox_id}/files/mkdir",
    response_model=FileEntryResponse,
    summary="Make a directory (-p)",
)
async def mkdir(sandbox_id: SandboxId, body: PathRequest, ctx: Ctx) -> FileEntryResponse:
    return FileEntryResponse.of(await ctx.manager.mkdir(sandbox_id, body.path))


@router.post("/v1/sandboxes/{sandbox_id}/files/rename", response_model=FileEntryResponse, summary="Rename a path")
async def rename(sandbox_id: SandboxId, body: RenameRequest, ctx: Ctx) -> FileEntryResponse:
    return FileEntryResponse.of(await ctx.manager.rename(sandbox_id, body.src, body.dst))
