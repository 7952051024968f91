"""files.watch: the real agent (a subprocess running a copy of the bbagent package) watched through AgentClient,
and the watch handler's bounds driven directly (a fake connection, a real inotify descriptor)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from branchbox.agent import supervise, watch, wire
from branchbox.agentclient.client import AgentClient
from branchbox.agentclient.watch import DirWatch, parse_event
from branchbox.errors import AgentError, FileNotFoundInSandboxError, LimitExceededError, NotADirectoryInSandboxError
from branchbox.models import FileEvent
from tests import test_agent
from tests.test_agent import GUARD, RunningAgent

# the real agent's fixtures, shared with tests/test_agent.py
agent_factory = test_agent.agent_factory
agent = test_agent.agent
client = test_agent.client

Seen = list[tuple[str, str]]
MANY_FILES = (
    "import os\nfor i in range(100000):\n os.close(os.open(f'f{i}', os.O_CREAT | os.O_WRONLY))\n os.unlink(f'f{i}')"
)


async def collect(w: DirWatch, want: Seen, seen: Seen | None = None) -> Seen:
    """Events until every one of ``want`` arrived (in any order), as (type, name)."""
    seen = [] if seen is None else seen
    async with asyncio.timeout(GUARD):
        while not all(x in seen for x in want):
            e = await anext(w)
            seen.append((e.type, e.name))
    return seen


def squeeze(seen: Seen) -> Seen:
    """Adjacent repeats folded (the kernel folds identical unread events too)."""
    return [x for i, x in enumerate(seen) if i == 0 or seen[i - 1] != x]


def inotify_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"
    return n


async def test_events_in_order_with_names_relative_to_the_watched_dir(client: AgentClient, agent: RunningAgent) -> None:
    d = agent.workdir / "w"
    d.mkdir()
    w = await client.watch(str(d))
    try:
        await client.exec("cd w && echo 1 > a && echo 2 >> a && mv a b && chmod 600 b && rm b && mkdir sub")
        seen = await collect(w, [("create", "sub")])
        assert squeeze(seen) == [
            ("create", "a"), ("write", "a"), ("rename", "a"), ("create", "b"), ("chmod", "b"), ("remove", "b"),
            ("create", "sub"),
        ]  # fmt: skip
    finally:
        await w.aclose()


async def test_files_write_is_a_create_then_a_write_and_its_temp_file_is_not_seen(
    client: AgentClient, agent: RunningAgent
) -> None:
    w = await client.watch(str(agent.workdir))
    try:
        await client.write_file(str(agent.workdir / "f.txt"), b"one")
        await client.write_file(str(agent.workdir / "f.txt"), b"two, longer")
        await client.mkdir(str(agent.workdir / "marker"))
        seen = await collect(w, [("create", "marker")])
        assert squeeze(seen) == [("create", "f.txt"), ("write", "f.txt"), ("create", "marker")]  # the 2nd: a write
    finally:
        await w.aclose()


async def test_recursive_watches_new_subdirectories(client: AgentClient, agent: RunningAgent) -> None:
    (agent.workdir / "old" / "deep").mkdir(parents=True)
    flat = await client.watch(str(agent.workdir))
    rec = await client.watch(str(agent.workdir), recursive=True)
    try:
        await client.exec("touch old/deep/x && mkdir -p new/a/b && touch new/a/b/y")
        seen = await collect(rec, [("create", "old/deep/x"), ("create", "new/a/b/y")])
        assert [e for e in seen if e[0] == "create"] == [
            ("create", "old/deep/x"), ("create", "new"), ("create", "new/a"), ("create", "new/a/b"),
            ("create", "new/a/b/y"),
        ]  # fmt: skip
        await client.exec("mv new moved && touch moved/a/z")  # moved: watched at its new name
        seen = await collect(rec, [("create", "moved/a/z")])
        assert seen.index(("rename", "new")) < seen.index(("create", "moved")) < seen.index(("create", "moved/a/z"))
        flat_seen = await collect(flat, [("create", "moved")])
        assert not any("/" in name for _, name in flat_seen)  # below the top level: not reported
    finally:
        await flat.aclose()
        await rec.aclose()


async def test_errors_like_envd(client: AgentClient, agent: RunningAgent) -> None:
    with pytest.raises(FileNotFoundInSandboxError):
        await client.watch(str(agent.workdir / "missing"))
    (agent.workdir / "file").write_text("x")
    with pytest.raises(NotADirectoryInSandboxError):
        await client.watch(str(agent.workdir / "file"))


async def test_a_removed_directory_ends_the_watch(client: AgentClient, agent: RunningAgent) -> None:
    d = agent.workdir / "gone"
    (d / "sub").mkdir(parents=True)
    w = await client.watch(str(d), recursive=True)
    await client.remove(str(d), recursive=True)
    async with asyncio.timeout(GUARD):
        seen = [(e.type, e.name) async for e in w]
    assert ("remove", "sub") in seen
    assert w.ended == "removed"
    assert inotify_fds(agent.agent_pid()) == 0


async def test_closing_removes_the_watches_and_loops_are_not_followed(client: AgentClient, agent: RunningAgent) -> None:
    d = agent.workdir / "loop"
    d.mkdir()
    (d / "self").symlink_to(d)  # a symlink loop: never walked into
    (d / "up").symlink_to("..")
    watches = [await client.watch(str(d), recursive=True) for _ in range(3)]
    assert inotify_fds(agent.agent_pid()) == 3
    await client.exec(f"touch {d}/self/through-the-link")
    seen = await collect(watches[0], [("create", "through-the-link")])
    assert seen == [("create", "through-the-link")]
    for w in watches:
        await w.aclose()
    await client.ping()  # the CANCELs were handled
    assert inotify_fds(agent.agent_pid()) == 0


async def test_a_sandbox_has_a_bounded_number_of_watches(client: AgentClient, agent: RunningAgent) -> None:
    opened = []
    try:
        for _ in range(watch.MAX_STREAMS):
            opened.append(await client.watch(str(agent.workdir)))
        with pytest.raises(LimitExceededError, match="at most"):
            await client.watch(str(agent.workdir))
    finally:
        for w in opened:
            await w.aclose()
    w = await client.watch(str(agent.workdir))  # closing gave them back
    await w.aclose()


# -- the handler's bounds, driven directly -------------------------------------------------------------------
class FakeConn:
    """What a Watch needs of protocol.Connection: the call table, send, the agent's loop and watch table."""

    def __init__(self) -> None:
        self.calls: dict[int, Any] = {}
        self.frames: list[tuple[int, int, bytes]] = []
        self.parser = wire.FrameParser()
        self.agent = supervise.Agent({}, "/")

    def send(self, frame: bytes) -> None:
        self.frames += self.parser.feed(frame)

    def lines(self) -> list[bytes]:
        out = [line for kind, _, p in self.frames if kind == wire.DATA for line in p[1:].split(b"\n") if line]
        self.frames.clear()
        return out


def _touch(d: Path, start: int, n: int) -> None:
    for i in range(start, start + n):
        os.close(os.open(d / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))


async def test_an_unread_watch_stays_bounded_and_reports_the_overflow(tmp_path: Path) -> None:
    """The host grants no credit: the agent queues at most MAX_PENDING events and stops reading; the kernel's
    queue (max_queued_events) holds the rest, and its overflow reaches the host as one overflow line."""
    conn = FakeConn()
    w = watch.Watch(conn, 1, str(tmp_path), False)  # type: ignore[arg-type]
    try:
        w.credit = 0  # nothing may be sent
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        _touch(tmp_path, 0, watch.MAX_PENDING + 100)
        for _ in range(1000):
            if not w.reading:
                break
            w.on_readable()
        assert not w.reading and watch.MAX_PENDING <= len(w.pending) < watch.MAX_PENDING + 3000
        held = len(w.pending)
        _touch(tmp_path, 10**6, limit + 100)  # now only the kernel's queue takes them: it overflows
        await asyncio.sleep(0)
        assert len(w.pending) == held  # nothing was read while paused
        w.on_window(1 << 30)  # the host catches up
        for _ in range(1000):
            w.on_readable()
            if w.pending:
                continue
            if any(b"overflow" in line for line in conn.lines()):
                break
        else:
            pytest.fail("no overflow line")
    finally:
        w.close()
    assert w.fd == -1 and not conn.agent.watches


async def test_the_agent_stays_bounded_when_a_sandbox_makes_many_files(
    client: AgentClient, agent: RunningAgent
) -> None:
    """Nobody reads the watch while 100,000 files come and go: the host buffers at most the window, the agent
    at most MAX_PENDING events, then the stream says events were lost; the agent's memory stays small."""
    w = await client.watch(str(agent.workdir))
    try:
        before = _rss_kib(agent.agent_pid())
        await client.exec(["python3", "-c", MANY_FILES])
        grown = _rss_kib(agent.agent_pid()) - before
        kinds: set[str] = set()
        async with asyncio.timeout(GUARD):
            async for e in w:
                kinds.add(e.type)
                if e.type == "overflow":
                    break
        assert kinds >= {"create", "remove", "overflow"}
        assert grown < 16 * 1024, f"the agent grew by {grown} KiB"
    finally:
        await w.aclose()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_the_watch_limit_refuses_a_big_tree_and_reports_a_late_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree with more directories than are left: refused at the start; directories made later beyond the
    limit: an overflow line (events below them are lost), never a watch past the limit."""
    monkeypatch.setattr(watch, "MAX_WATCHES", 20)
    big, small = tmp_path / "big", tmp_path / "small"
    for i in range(25):
        (big / f"d{i}").mkdir(parents=True)
    for i in range(10):
        (small / f"d{i}").mkdir(parents=True)
    conn = FakeConn()
    with pytest.raises(watch.CallError) as info:
        watch.Watch(conn, 1, str(big), True)  # type: ignore[arg-type]
    assert info.value.code == "limit_exceeded" and not conn.agent.watches
    w = watch.Watch(conn, 2, str(small), True)  # type: ignore[arg-type]
    try:
        assert len(w.dirs) == 11
        for i in range(15):
            (small / f"late{i}").mkdir()
        for _ in range(100):
            w.on_readable()
            if len(w.dirs) >= 20:
                break
        w.on_readable()
        assert len(w.dirs) == 20
        assert b'{"type":"overflow","reason":"watch_limit"}' in conn.lines()
    finally:
        w.close()


def test_the_host_refuses_malformed_watch_lines() -> None:
    """A sandbox's PID 1 is not trusted: its watch lines are checked, never trusted to be JSON of the right shape."""
    assert parse_event(b'{"type":"create","name":"a/b","dir":true}') == FileEvent("create", "a/b", is_dir=True)
    assert parse_event(b'{"type":"overflow","reason":"queue"}') == FileEvent("overflow", "", reason="queue")
    for bad in (b"not json", b"[1]", b'{"type":"explode","name":"x"}', b'{"type":"create","name":3}', b"{}"):
        with pytest.raises(AgentError, match="malformed watch event"):
            parse_event(bad)
