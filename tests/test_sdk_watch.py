"""``sbx.files.watch_dir`` of branchbox's own SDK (sync and async) against a real daemon: the API's watch
WebSocket on the agent's inotify watch."""

from __future__ import annotations

import asyncio

import pytest

from branchbox.sdk import AsyncSandbox, FileNotFoundError_, FilesystemEvent, Sandbox
from tests.conftest import DaemonProc

GUARD = 60  # seconds: a hang guard, never asserted on
pytestmark = pytest.mark.timeout(300)


def test_watch_dir_sync(daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=daemon.url) as sbx:
        sbx.files.make_dir("/work/w/old")
        seen: list[tuple[str, str]] = []
        with sbx.files.watch_dir("/work/w", recursive=True) as events:
            sbx.commands.run("cd /work/w && echo 1 > a && mv a b && chmod 600 b && rm b && mkdir -p new/x "
                             "&& touch old/f new/x/g")  # fmt: skip
            for e in events:
                assert isinstance(e, FilesystemEvent)
                seen.append((e.type, e.name))
                if ("create", "old/f") in seen and ("create", "new/x/g") in seen:
                    break
        assert seen[:6] == [("create", "a"), ("write", "a"), ("rename", "a"), ("create", "b"), ("chmod", "b"),
                            ("remove", "b")]  # fmt: skip
        assert ("create", "new/x") in seen
        with pytest.raises(FileNotFoundError_), sbx.files.watch_dir("/work/missing"):
            pass
        # the directory removed: the iteration ends by itself
        sbx.files.make_dir("/work/gone")
        with sbx.files.watch_dir("/work/gone") as events:
            sbx.commands.run("sleep 0.2; rm -r /work/gone", background=True)
            assert list(events) == []  # nothing happened inside it: only the end


async def test_watch_dir_async(daemon: DaemonProc) -> None:
    async with await AsyncSandbox.create(base_url=daemon.url) as sbx:
        await sbx.files.make_dir("/work/aw")
        async with sbx.files.watch_dir("/work/aw") as events:
            await sbx.files.write("/work/aw/f.txt", "x")  # through the agent's files.write: a create, a write
            await sbx.files.write("/work/aw/f.txt", "xy")  # an overwrite: a write
            await sbx.files.make_dir("/work/aw/end")
            seen: list[tuple[str, str]] = []
            async with asyncio.timeout(GUARD):
                async for e in events:
                    seen.append((e.type, e.name))
                    if e.name == "end":
                        break
        assert [x for i, x in enumerate(seen) if i == 0 or seen[i - 1] != x] == [
            ("create", "f.txt"), ("write", "f.txt"), ("create", "end")]  # fmt: skip
        # leaving the block stopped the watch in the sandbox: a new one has its place (32 at most at once)
        for _ in range(40):
            async with sbx.files.watch_dir("/work/aw"):
                pass
