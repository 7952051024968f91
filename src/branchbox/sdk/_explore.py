"""Parallel exploration: fork a sandbox once per command, run the commands side by side, return in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from branchbox.sdk._async import AsyncSandbox
from branchbox.sdk._errors import SandboxError
from branchbox.sdk._models import CommandResult
from branchbox.sdk._sync import Sandbox

Cmd = str | Sequence[str]


def explore(sbx: Sandbox, cmds: Sequence[Cmd], *, timeout: float | None = 60.0) -> list[CommandResult | SandboxError]:
    """Fork ``sbx`` once per command and run each command in its own child, in parallel.

    Returns one entry per command, in order: its :class:`CommandResult` (a non-zero exit is a result) or the
    exception its fork or run met. The children are killed afterwards; ``sbx`` itself is not changed."""
    if not cmds:
        return []
    kids = sbx.fork(count=len(cmds))

    def run(kid: Sandbox | SandboxError, cmd: Cmd) -> CommandResult | SandboxError:
        if isinstance(kid, SandboxError):
            return kid
        try:
            return kid.commands.run(cmd, timeout=timeout)
        except SandboxError as exc:
            return exc
        finally:
            with contextlib.suppress(SandboxError):
                kid.kill()
            kid.close()

    with ThreadPoolExecutor(max_workers=min(len(cmds), 32)) as pool:
        return list(pool.map(run, kids, cmds))


async def aexplore(
    sbx: AsyncSandbox, cmds: Sequence[Cmd], *, timeout: float | None = 60.0
) -> list[CommandResult | SandboxError]:
    """:func:`explore` for :class:`AsyncSandbox`."""
    if not cmds:
        return []
    kids = await sbx.fork(count=len(cmds))

    async def run(kid: AsyncSandbox | SandboxError, cmd: Cmd) -> CommandResult | SandboxError:
        if isinstance(kid, SandboxError):
            return kid
        try:
            return await kid.commands.run(cmd, timeout=timeout)
        except SandboxError as exc:
            return exc
        finally:
            with contextlib.suppress(SandboxError):
                await kid.kill()
            await kid.close()

    return list(await asyncio.gather(*(run(k, c) for k, c in zip(kids, cmds, strict=True))))
