"""``branchbox serve``: one Manager, one HTTP app, uvicorn, graceful shutdown on SIGTERM/SIGINT.

On shutdown open requests get ``graceful_timeout`` seconds, then the Manager closes: sandboxes keep running
(``keep_sandboxes_on_shutdown = true``, the default) and are re-attached by the next start, or are destroyed.

The HTTP parser is httptools when installed (else h11). The event loop is ``event_loop`` in the config:
``auto`` (the default: uvloop when installed), ``asyncio`` or ``uvloop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import math
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

import structlog
import uvicorn

from branchbox._version import VERSION
from branchbox.api import create_app
from branchbox.api.warmup import warm_routes
from branchbox.daemon.claims import claim
from branchbox.daemon.config import DaemonConfig
from branchbox.daemon.logs import configure_logging
from branchbox.errors import BranchboxError

if TYPE_CHECKING:
    from branchbox.api.settings import ApiSettings


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def http_impl() -> type[asyncio.Protocol] | str:
    """The HTTP/1.1 protocol: uvicorn's httptools one (C parser) with the hot routes answered without ASGI
    (:mod:`branchbox.daemon.http_front`) when httptools is installed, else uvicorn's h11 one."""
    if not _has("httptools"):
        return "h11"
    from branchbox.daemon.http_front import FrontProtocol  # noqa: PLC0415 - imports httptools

    return FrontProtocol


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for ``choice`` (asyncio | uvloop | auto); None is asyncio's default loop."""
    if choice == "asyncio" or (choice == "auto" and not _has("uvloop")):
        return None
    import uvloop  # noqa: PLC0415 - optional at run time

    return uvloop.new_event_loop


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its own shutdown, which would kill us before the Manager closes."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)


def daemon_version() -> str:
    return VERSION


# a fleet join (branchbox.fleet.node via the CLI): called with the port while the daemon starts, off the event
# loop; returns how to leave
JoinHook = Callable[[int], Callable[[], None]]


async def serve(cfg: DaemonConfig, join: JoinHook | None = None) -> None:
    """Claim this daemon's data dir and host-unique names, then run until SIGTERM/SIGINT. Logging must already be
    configured."""
    log = structlog.get_logger("branchbox.daemon")
    api_settings = cfg.api_settings(daemon_version())  # reads the keys file: fail before touching state
    log.info("daemon.starting", data_dir=str(cfg.data_dir), backend=cfg.default_backend)
    host_claim = claim(cfg.data_dir, cfg.wanted_names())  # ClaimError: another daemon owns a name or the dir
    try:
        cfg = cfg.with_names(host_claim.names)
        log.info("daemon.names", **asdict(host_claim.names))
        await _serve(cfg, api_settings, join)
    finally:
        host_claim.release()
    log.info("daemon.stopped")


async def _serve(cfg: DaemonConfig, api_settings: ApiSettings, join: JoinHook | None) -> None:
    from branchbox.core.manager import Manager  # noqa: PLC0415 - heavy; keeps `branchbox --help` fast
    from branchbox.workspaces.service import WorkspaceService  # noqa: PLC0415 - likewise

    log = structlog.get_logger("branchbox.daemon")
    manager = Manager(cfg.manager_settings())
    # git workspaces, above core: the Manager starts them after its recovery and closes them before its sandboxes
    workspaces = manager.add_service(WorkspaceService(manager))
    async with manager:
        app = create_app(manager, api_settings, workspaces=workspaces)
        config = uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            http=http_impl(),
            ws="websockets-sansio",
            ws_max_size=16 * 1024 * 1024,
            timeout_graceful_shutdown=math.ceil(cfg.graceful_timeout),
            server_header=False,
            proxy_headers=False,  # nothing reads the client's address; X-Forwarded-* would only cost a rewrite
        )
        server = _Server(config)
        await warm_routes(app)  # FastAPI's per-route state now (the lifespan would too), so that it is frozen
        # what start-up made (FastAPI, pydantic, the Manager) lives as long as the daemon: move it out of the
        # collector's sight, so collections during requests walk only what requests allocate
        gc.collect()
        gc.freeze()
        log.info(
            "daemon.listening",
            host=cfg.host,
            port=cfg.port,
            http=config.http if isinstance(config.http, str) else "httptools+fast-path",
            loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            pools=[p.template for p in cfg.pools],
            auth_required=api_settings.auth_required,
            keys=len(api_settings.api_key_hashes),
        )
        joined = asyncio.ensure_future(_join(join, cfg.port)) if join is not None else None
        await server.serve()
        log.info("daemon.stopping", keep_sandboxes=cfg.keep_sandboxes_on_shutdown)
        if joined is not None:
            await _leave(joined)


async def _join(join: JoinHook, port: int) -> Callable[[], None] | None:
    """Join while the server starts (the node agent reads the daemon only after it is up, and retries)."""
    log = structlog.get_logger("branchbox.daemon")
    try:
        leave = await asyncio.get_running_loop().run_in_executor(None, join, port)
    except Exception:
        log.exception("fleet.join_failed")  # the daemon keeps serving on its own
        return None
    log.info("fleet.joined")
    return leave


async def _leave(joined: asyncio.Future[Callable[[], None] | None]) -> None:
    if not joined.done():
        joined.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        leave = await joined
        if leave is not None:
            await asyncio.get_running_loop().run_in_executor(None, leave)


def run(cfg: DaemonConfig, join: JoinHook | None = None) -> None:
    """Configure logging and serve (blocking). A branchbox error at start (e.g. a pool of an unknown template)
    is logged and exits with status 2. ``join``: see :data:`JoinHook`."""
    configure_logging(cfg.log_level, cfg.log_format)
    try:
        with asyncio.Runner(loop_factory=loop_factory(cfg.event_loop)) as runner:
            runner.run(serve(cfg, join))
    except BranchboxError as exc:
        structlog.get_logger("branchbox.daemon").error("daemon.failed", code=exc.code, message=exc.message)
        sys.exit(2)
