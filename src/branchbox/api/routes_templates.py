"""Template builds from a Dockerfile: ``POST /v1/templates`` (the build context as a tar body) -> an NDJSON log.

The body is spooled to a file in ``DATA/build-contexts`` (bounded by ``max_upload_bytes``) and read in place;
the build runs as a task whose events become one JSON object per line. A client that goes away cancels
the build: its sandbox is destroyed and nothing is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from branchbox.api.context import Ctx
from branchbox.api.routes_images import check_registry
from branchbox.api.schemas import TemplateResponse
from branchbox.errors import BadRequestError, BranchboxError, ImageReferenceError
from branchbox.images.dockerfile_build import DockerfileBuild
from branchbox.images.dockerfile_context import Context
from branchbox.images.oci_fetch import parse_ref
from branchbox.models import TemplateInfo

router = APIRouter(tags=["templates"])

_TAR: dict[str, Any] = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
_PREFIX = ".build-context-"
_IDLE_CHECK_S = 1.0  # while no event comes, check this often whether the client is still there
_NDJSON: dict[str, Any] = {"application/x-ndjson": {"schema": {"type": "string"}}}
_DESCRIPTION = """\
The body is the build context as a tar (plain, gz, bz2 or xz), with the Dockerfile inside it (`dockerfile`,
default `Dockerfile`; clients put one from outside the context at `.branchbox.Dockerfile`). The answer is a
stream of JSON objects, one per line (`application/x-ndjson`):

* `{"type": "step", "step": N, "total": M, "line": L, "instruction": "RUN ..."}` as each instruction starts,
* `{"type": "cached"}` or `{"type": "running"}` right after it (`cached`: the step's result was reused),
* `{"type": "log", "data": "..."}` output of a RUN step (stdout and stderr, as it comes),
* `{"type": "commit", "message": "..."}` while the template is written,
* `{"type": "built", "name": ..., "digest": ..., "seconds": ...}` then `{"type": "done", "template": {...}}`,
* or, last, `{"type": "error", "error": {"code", "message", "details"}}`: the build failed (the message names
  the Dockerfile line; a failed RUN has `exit_code` and the last lines of its output) and left nothing behind.

Errors found before the build starts (a bad name, a body that is not a tar, a missing Dockerfile) are plain
JSON errors with their HTTP status. docs/templates.md, "Dockerfile builds", lists what each instruction does."""


def _build_args(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not key or not sep:
            raise BadRequestError(f"build_arg {value!r} is not KEY=VALUE: pass ?build_arg=KEY=VALUE")
        out[key] = val
    return out


def _clear_stale(directory: Path, active: set[Path]) -> None:
    """Remove spooled contexts no build of this daemon uses (a daemon killed in the middle of a build left them;
    one daemon owns its data dir). Runs on the event loop, so no build can spool a context meanwhile (a few
    names: no thread hop)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith(_PREFIX) and Path(entry.path) not in active:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


async def _spool(request: Request, directory: Path, active: set[Path]) -> Path:
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_PREFIX, dir=directory)
    active.add(Path(name))  # before any await: a build starting meanwhile must not take it for stale
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                if chunk:
                    await asyncio.to_thread(fh.write, chunk)
    except BaseException:
        active.discard(Path(name))
        os.unlink(name)
        raise
    return Path(name)


@router.post(
    "/v1/templates",
    response_class=StreamingResponse,
    openapi_extra={"requestBody": {"required": True, "content": _TAR}},
    responses={200: {"content": _NDJSON, "description": "The build log, one JSON object per line."}},
    summary="Build a template from a Dockerfile (the build context as a tar body)",
    description=_DESCRIPTION,
)
async def build_template(
    request: Request,
    ctx: Ctx,
    name: Annotated[str, Query(description="Name of the template to build.")],
    dockerfile: Annotated[str, Query(description="Path of the Dockerfile inside the context.")] = "Dockerfile",
    build_arg: Annotated[list[str] | None, Query(description="KEY=VALUE for an ARG (repeat for more).")] = None,
) -> StreamingResponse:
    args = _build_args(build_arg or [])
    data = ctx.manager.settings.data_dir
    active: set[Path] = request.app.state.__dict__.setdefault("template_contexts", set())
    _clear_stale(data / "build-contexts", active)
    path = await _spool(request, data / "build-contexts", active)

    def drop_context() -> None:
        active.discard(path)
        path.unlink(missing_ok=True)

    try:
        context = await asyncio.to_thread(Context, path)
    except BaseException:
        drop_context()
        raise
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def emit(event: dict[str, Any]) -> None:  # also called from an image import's unpacking thread
        loop.call_soon_threadsafe(queue.put_nowait, event)

    async def check_image(reference: str) -> None:
        """FROM an image, over the API: registries only (checked before the reference is parsed: parsing an
        archive's reference looks at the daemon host's file), none in a range sandboxes cannot reach (as
        POST /v1/templates/import)."""
        transport = reference.partition(":")[0]
        if transport != "docker":
            raise ImageReferenceError(
                f"FROM takes registry images only over the API (docker://... or name:tag), not {transport}:; "
                "import archives, layouts and a local Docker daemon's images on the host with `branchbox template "
                "import-image` and use FROM NAME"
            )
        await check_registry(parse_ref(reference), ctx.manager.settings.workspaces.allow_cidrs)

    try:
        build = DockerfileBuild(ctx.manager, context, name=name, dockerfile=dockerfile, build_args=args, emit=emit,
                                cache_dir=data / "build-cache", check_image=check_image)  # fmt: skip
    except BaseException:
        context.close()
        drop_context()
        raise

    async def work() -> None:
        try:
            info = await build.run()
            ctx.log.info("template_built", template=info.name, digest=info.digest)
            emit({"type": "done", "template": _template(info)})
        except BranchboxError as exc:
            emit({"type": "error", "error": exc.to_dict()})
        except Exception as exc:
            ctx.log.exception("template_build_crashed")
            emit({"type": "error", "error": {"code": "internal", "message": f"build failed: {exc}"}})
        finally:
            context.close()
            drop_context()
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = asyncio.get_running_loop().create_task(work())
    builds: set[asyncio.Task[None]] = request.app.state.__dict__.setdefault("template_builds", set())

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), _IDLE_CHECK_S)
                except TimeoutError:  # a quiet step: a client that went away is seen only by asking
                    if await request.is_disconnected():
                        return
                    continue
                if event is None:
                    return
                yield (json.dumps(event, separators=(",", ":")) + "\n").encode()
        finally:
            if not task.done():  # the client went away: stop the build (its sandbox is destroyed)
                task.cancel()  # once: awaiting the task here would cancel it again with every cancellation of
                builds.add(task)  # this generator, and cut its cleanup short; it finishes on its own
                task.add_done_callback(builds.discard)

    return StreamingResponse(body(), media_type="application/x-ndjson")


def _template(info: TemplateInfo) -> dict[str, Any]:
    return TemplateResponse.of(info).model_dump(mode="json")
