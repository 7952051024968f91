"""``files.watch_dir`` through the unmodified e2b SDK against a real daemon: the sync SDK's polled watcher
(CreateWatcher / GetWatcherEvents / RemoveWatcher) and the async SDK's WatchDir stream, both on the agent's
inotify watch."""

from __future__ import annotations

import asyncio
import time

import pytest
from e2b.exceptions import InvalidArgumentException, NotFoundException, RateLimitException, SandboxException

from e2b import AsyncSandbox, Sandbox
from tests.e2b.conftest import E2BDaemon

pytestmark = pytest.mark.timeout(300)
GUARD = 60  # seconds: a hang guard, never asserted on
Seen = list[tuple[str, str]]
ORDER = "cd {d} && echo 1 > a && echo 2 >> a && mv a b && chmod 600 b && rm b && mkdir end"
FLOOD = "import os\nfor i in range(100000):\n os.close(os.open(f'f{i}', os.O_CREAT | os.O_WRONLY))\n os.unlink(f'f{i}')"
EXPECTED = [("a", "create"), ("a", "write"), ("a", "rename"), ("b", "create"), ("b", "chmod"), ("b", "remove"),
            ("end", "create")]  # fmt: skip


def squeeze(seen: Seen) -> Seen:
    """Adjacent repeats folded (a file written twice before the watcher read it may show one write or two)."""
    return [x for i, x in enumerate(seen) if i == 0 or seen[i - 1] != x]


def _events_until(wh: object, want: Seen) -> Seen:
    """The sync watcher's events until every one of ``want`` arrived."""
    seen: Seen = []
    deadline = time.monotonic() + GUARD
    while not all(w in seen for w in want) and time.monotonic() < deadline:
        seen += [(e.name, e.type.value) for e in wh.get_new_events()]  # type: ignore[attr-defined]
        time.sleep(0.02)
    return seen


def _drain(wh: object, seen: Seen) -> None:
    """The sync watcher's events into ``seen`` until it fails (or the guard passes)."""
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        seen += [(e.name, e.type.value) for e in wh.get_new_events()]  # type: ignore[attr-defined]
        time.sleep(0.02)


def test_watch_dir_reports_each_change_in_order(sbx: Sandbox) -> None:
    f = sbx.files
    f.make_dir("/tmp/w")
    wh = f.watch_dir("/tmp/w")
    try:
        sbx.commands.run(ORDER.format(d="/tmp/w"))
        assert squeeze(_events_until(wh, [("end", "create")])) == EXPECTED
        f.write("/tmp/w/new.txt", "1")  # through envd's /files: a create and a write, as envd reports it
        f.write("/tmp/w/new.txt", "longer")  # an overwrite: a write
        f.rename("/tmp/w/new.txt", "/tmp/w/moved.txt")
        f.remove("/tmp/w/moved.txt")
        seen = _events_until(wh, [("moved.txt", "remove")])
        assert squeeze(seen) == [("new.txt", "create"), ("new.txt", "write"), ("new.txt", "rename"),
                                 ("moved.txt", "create"), ("moved.txt", "remove")]  # fmt: skip
    finally:
        wh.stop()
    with pytest.raises(SandboxException):
        wh.get_new_events()


def test_recursive_watch_follows_new_subdirectories(sbx: Sandbox) -> None:
    f = sbx.files
    f.make_dir("/tmp/r/old")
    rec = f.watch_dir("/tmp/r", recursive=True)
    flat = f.watch_dir("/tmp/r")
    try:
        sbx.commands.run("cd /tmp/r && touch old/x && mkdir -p new/a/b && echo hi > new/a/b/y && touch top")
        seen = _events_until(rec, [("old/x", "create"), ("new/a/b/y", "create"), ("top", "create")])
        assert ("new", "create") in seen and ("new/a", "create") in seen
        top = _events_until(flat, [("top", "create")])
        assert ("new", "create") in top and not any("/" in name for name, _ in top)
    finally:
        rec.stop()
        flat.stop()


def test_watch_errors_like_envd(sbx: Sandbox) -> None:
    with pytest.raises(NotFoundException):
        sbx.files.watch_dir("/tmp/nope")
    sbx.files.write("/tmp/plain", "x")
    with pytest.raises(InvalidArgumentException):
        sbx.files.watch_dir("/tmp/plain")


def test_a_sandbox_has_a_bounded_number_of_watchers(sbx: Sandbox) -> None:
    sbx.files.make_dir("/tmp/many")
    handles = []
    try:
        for _ in range(16):
            handles.append(sbx.files.watch_dir("/tmp/many", recursive=True))
        with pytest.raises(RateLimitException, match="at most 16 watchers"):
            sbx.files.watch_dir("/tmp/many")
        handles.pop().stop()
        handles.append(sbx.files.watch_dir("/tmp/many"))  # stopping one gave its place back
    finally:
        for h in handles:
            h.stop()


def test_a_removed_directory_ends_the_watcher(sbx: Sandbox) -> None:
    sbx.files.make_dir("/tmp/doomed/sub")
    wh = sbx.files.watch_dir("/tmp/doomed", recursive=True)
    sbx.commands.run("touch /tmp/doomed/sub/f && rm -r /tmp/doomed")
    seen: Seen = []
    with pytest.raises(NotFoundException, match="was removed"):
        _drain(wh, seen)
    assert ("sub/f", "create") in seen and ("sub", "remove") in seen
    wh.stop()


async def test_async_watch_dir_streams_events_in_order(e2b_env: E2BDaemon) -> None:
    sbx = await AsyncSandbox.create("default", timeout=120)
    try:
        await sbx.files.make_dir("/tmp/aw")
        got = asyncio.Event()
        events: Seen = []

        def on_event(e: object) -> None:
            events.append((e.name, e.type.value))  # type: ignore[attr-defined]
            if ("end", "create") in events:
                got.set()

        wh = await sbx.files.watch_dir("/tmp/aw", on_event=on_event)
        await sbx.commands.run(ORDER.format(d="/tmp/aw"))
        await asyncio.wait_for(got.wait(), GUARD)
        await wh.stop()
        assert squeeze(events) == EXPECTED
        with pytest.raises(NotFoundException):
            await sbx.files.watch_dir("/tmp/none", on_event=on_event)
        await sbx.files.write("/tmp/afile", "x")
        with pytest.raises(InvalidArgumentException):
            await sbx.files.watch_dir("/tmp/afile", on_event=on_event)
    finally:
        await sbx.kill()


async def test_async_watch_ends_cleanly_when_its_directory_goes(e2b_env: E2BDaemon) -> None:
    sbx = await AsyncSandbox.create("default", timeout=120)
    try:
        await sbx.files.make_dir("/tmp/ad/sub")
        exits: asyncio.Queue[object] = asyncio.Queue()
        events: Seen = []
        await sbx.files.watch_dir(
            "/tmp/ad", recursive=True, on_event=lambda e: events.append((e.name, e.type.value)),
            on_exit=exits.put_nowait,
        )  # fmt: skip
        await sbx.commands.run("touch /tmp/ad/sub/f && rm -r /tmp/ad")
        assert await asyncio.wait_for(exits.get(), GUARD) is None  # ended without an error
        assert ("sub/f", "create") in events and ("sub", "remove") in events
    finally:
        await sbx.kill()


def test_watching_proc_is_bounded_and_quiet(sbx: Sandbox) -> None:
    """/proc (a pseudo filesystem: no inotify events) can be watched, recursively too, within the agent's limits;
    its symlinks (/proc/self, /proc/*/cwd, /proc/*/root: loops) are not followed."""
    wh = sbx.files.watch_dir("/proc", recursive=True)
    try:
        sbx.commands.run("cat /proc/self/status > /dev/null")
        assert [e for e in wh.get_new_events() if not e.name.split("/")[0].isdigit()] == []
    finally:
        wh.stop()


def test_a_flood_nobody_reads_stays_bounded_and_fails_the_watcher(sbx: Sandbox) -> None:
    """100,000 files made and removed under a watcher nobody reads: the facade keeps at most 10,000 events and
    then stops reading, the agent and the kernel hold a bounded rest, and the kernel's overflow fails the watcher
    (as envd's does: events were lost) once what was kept has been read; the sandbox and the daemon go on."""
    sbx.files.make_dir("/tmp/flood")
    wh = sbx.files.watch_dir("/tmp/flood")
    sbx.files.write("/tmp/flood.py", FLOOD)
    sbx.commands.run("python3 /tmp/flood.py", cwd="/tmp/flood", timeout=120)
    seen: Seen = []
    with pytest.raises(SandboxException, match="overflowed"):
        _drain(wh, seen)
    assert 10_000 <= len(seen) < 200_000 and seen[0] == ("f0", "create")
    wh.stop()
    assert sbx.commands.run("echo alive").stdout == "alive\n"


ENTRIES = "cd {d} && printf hello > a && mkdir d && ln -s a l && rm a && mv d e && mkdir end"


def _entries(events: list[object]) -> dict[tuple[str, str], object]:
    return {(e.name, e.type.value): e.entry for e in events}  # type: ignore[attr-defined]


def _check_entries(by_event: dict[tuple[str, str], object], d: str) -> None:
    """Entries as the paths are when the event is handled: none for a removal or a rename (the name is gone)."""
    assert by_event[("a", "remove")] is None and by_event[("d", "rename")] is None
    a = by_event[("a", "create")]  # a file, if it was still there when its create was handled
    assert a is None or (a.type.value == "file" and a.path == f"{d}/a")  # type: ignore[attr-defined]
    e, link = by_event[("e", "create")], by_event[("l", "create")]
    assert e is not None and e.type.value == "dir" and e.path == f"{d}/e" and e.name == "e"  # type: ignore[attr-defined]
    assert link is not None and link.symlink_target == "a" and link.path == f"{d}/l"  # type: ignore[attr-defined]


def test_watch_events_carry_entries_when_asked(sbx: Sandbox) -> None:
    assert Sandbox.get_info(sbx.sandbox_id).envd_version == "0.6.3"
    f = sbx.files
    f.make_dir("/tmp/ie")
    plain = f.watch_dir("/tmp/ie")
    wh = f.watch_dir("/tmp/ie", include_entry=True)
    try:
        f.write("/tmp/ie/w.txt", "12345")  # the file stays: its entry is there when the events are handled
        sbx.commands.run(ENTRIES.format(d="/tmp/ie"))
        events: list[object] = []
        deadline = time.monotonic() + GUARD
        while not any(e.name == "end" for e in events) and time.monotonic() < deadline:  # type: ignore[attr-defined]
            events += wh.get_new_events()
            time.sleep(0.02)
        by_event = _entries(events)
        _check_entries(by_event, "/tmp/ie")
        written = by_event[("w.txt", "write")]
        assert written is not None and written.size == 5 and written.type.value == "file"  # type: ignore[attr-defined]
        assert all(e.entry is None for e in plain.get_new_events())  # a watch that did not ask gets none
    finally:
        wh.stop()
        plain.stop()


async def test_async_watch_events_carry_entries_when_asked(e2b_env: E2BDaemon) -> None:
    sbx = await AsyncSandbox.create("default", timeout=120)
    try:
        await sbx.files.make_dir("/tmp/aie")
        events: list[object] = []
        done = asyncio.Event()

        def on_event(e: object) -> None:
            events.append(e)
            if e.name == "end":  # type: ignore[attr-defined]
                done.set()

        wh = await sbx.files.watch_dir("/tmp/aie", on_event=on_event, include_entry=True)
        await sbx.commands.run(ENTRIES.format(d="/tmp/aie"))
        await asyncio.wait_for(done.wait(), GUARD)
        await wh.stop()
        _check_entries(_entries(events), "/tmp/aie")
    finally:
        await sbx.kill()


def test_a_file_written_for_a_user_is_theirs_without_a_chmod_event(sbx: Sandbox) -> None:
    f = sbx.files
    f.make_dir("/tmp/uw")
    wh = f.watch_dir("/tmp/uw")
    try:
        f.write("/tmp/uw/n.txt", "1", user="nobody")
        f.write("/tmp/uw/n.txt", "22", user="nobody")  # an overwrite keeps the owner
        sbx.commands.run("mkdir /tmp/uw/end")
        seen = squeeze(_events_until(wh, [("end", "create")]))
        assert seen == [("n.txt", "create"), ("n.txt", "write"), ("end", "create")]  # envd's events: no chmod
    finally:
        wh.stop()
    assert f.get_info("/tmp/uw/n.txt").owner == "nobody"
    f.write("/tmp/uw/a/b/deep.txt", "x", user="nobody")  # the parents the write makes are the user's too
    assert [f.get_info(p).owner for p in ("/tmp/uw/a", "/tmp/uw/a/b", "/tmp/uw/a/b/deep.txt")] == ["nobody"] * 3
    with pytest.raises(InvalidArgumentException):
        f.write("/tmp/uw/x.txt", "x", user="no-such-user")
    assert not f.exists("/tmp/uw/x.txt")  # nothing is written for a user that does not exist
