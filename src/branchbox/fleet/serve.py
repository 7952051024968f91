"""``branchbox fleet serve``: the controller (registry + node-loss detection) behind the daemon's HTTP API."""

from __future__ import annotations

import asyncio
import sys

import structlog
import uvicorn

from branchbox.api.auth import ApiKeyChecker
from branchbox.daemon.logs import configure_logging
from branchbox.daemon.serve import _Server, daemon_version
from branchbox.fleet.controller import Controller, ControllerSettings
from branchbox.fleet.proxy import FleetFront, create_fleet_app


async def serve_fleet(settings: ControllerSettings, *, host: str, port: int, keys: ApiKeyChecker) -> None:
    log = structlog.get_logger("branchbox.fleet")
    controller = Controller(settings)
    await controller.start()
    front = FleetFront(controller, keys=keys, version=daemon_version())
    config = uvicorn.Config(
        create_fleet_app(front),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="websockets-sansio",
        ws_max_size=16 * 1024 * 1024,
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    log.info("fleet.listening", host=host, port=port, ray=settings.address, policy=settings.policy)
    try:
        await _Server(config).serve()
    finally:
        await front.aclose()
        await controller.close()
    log.info("fleet.stopped")


def run_fleet(settings: ControllerSettings, *, host: str, port: int, keys: ApiKeyChecker, log_level: str) -> None:
    configure_logging(log_level, "json")
    try:
        asyncio.run(serve_fleet(settings, host=host, port=port, keys=keys))
    except ConnectionError as exc:
        structlog.get_logger("branchbox.fleet").error("fleet.failed", error=str(exc))
        sys.exit(2)
