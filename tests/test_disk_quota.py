"""Disk limits (issue 21.3), the way users reach them: the SDK against a real daemon whose data dir is on a btrfs
filesystem the test makes (a loop device, unmounted and detached even when the test fails)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from branchbox.core.manager import Manager
from branchbox.sdk import BadRequestError, DiskFullError, NotSupportedError, RateLimitError, Sandbox
from branchbox.storage import quota
from branchbox.storage.btrfs import BtrfsDriver
from tests.conftest import TEST_ROOT, DaemonProc, make_settings

pytestmark = [
    pytest.mark.root,
    pytest.mark.template,
    pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="mkfs.btrfs is missing: apt-get install btrfs-progs"),
]

QUOTA_MSG = "Disk quota exceeded"


class LoopFs:
    """A btrfs filesystem of ``size_mb`` on a loop device under the test root (named btrfs-*: a fixture mount
    for the leak checks)."""

    def __init__(self, size_mb: int) -> None:
        TEST_ROOT.mkdir(parents=True, exist_ok=True)
        tag = f"btrfs-quota-{os.getpid()}-{secrets.token_hex(3)}"
        self.img = TEST_ROOT / f"{tag}.img"
        self.mnt = TEST_ROOT / tag
        self.mounted = False
        self.mnt.mkdir()
        try:
            with open(self.img, "wb") as f:
                f.truncate(size_mb << 20)
            subprocess.run(["mkfs.btrfs", "-q", str(self.img)], check=True, capture_output=True)
            subprocess.run(["mount", "-o", "loop", str(self.img), str(self.mnt)], check=True, capture_output=True)
            self.mounted = True  # mount -o loop sets autoclear: the umount detaches the loop device
            os.chmod(self.mnt, 0o711)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if self.mounted and subprocess.run(["umount", str(self.mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        self.mnt.rmdir()
        self.img.unlink(missing_ok=True)


@pytest.fixture
def btrfs_daemon(default_template: Any) -> Iterator[Callable[..., DaemonProc]]:
    """``btrfs_daemon(size_mb=1024, config=TOML)``: a daemon whose data dir is on a fresh btrfs of its own."""
    made: list[tuple[LoopFs, DaemonProc | None]] = []

    def make(size_mb: int = 1024, config: str | None = None) -> DaemonProc:
        fs = LoopFs(size_mb)
        made.append((fs, None))
        data = fs.mnt / f"data-{secrets.token_hex(4)}"  # DaemonProc's cgroup parent comes from the name
        data.mkdir(mode=0o711)
        d = DaemonProc(data, config=config)
        made[-1] = (fs, d)
        d.start()
        return d

    yield make
    for fs, d in made:
        try:
            if d is not None:
                print(f"--- the log of the daemon on {d.data_dir} ---\n{d.log()}")
            if d is not None and d.proc is not None:  # a daemon that never started has nothing to clean
                d.cleanup()
        finally:
            fs.remove()


def gone(sbx: Sandbox) -> None:
    """Destroy the sandbox and close its client's connection."""
    try:
        sbx.kill()
    finally:
        sbx.close()


def write(sbx: Sandbox, path: str, mb: int) -> Any:
    """Write ``mb`` MiB of zeros to ``path`` inside the sandbox, synced (the quota is charged at allocation)."""
    return sbx.commands.run(f"head -c {mb}M /dev/zero > {path} && sync {path}", timeout=120)


def test_a_sandbox_writing_past_its_disk_limit_gets_edquot_and_others_write_on(
    btrfs_daemon: Callable[..., DaemonProc],
) -> None:
    d = btrfs_daemon()
    small = Sandbox.create(base_url=d.url, disk_mb=64, allow_internet_access=False)
    other = Sandbox.create(base_url=d.url, allow_internet_access=False)
    try:
        assert small.info.disk_mb == 64
        assert other.info.disk_mb == 10240  # the daemon's default_disk_mb
        assert small.get_info().disk_mb == 64
        r = write(small, "/big", 100)
        assert r.exit_code != 0
        assert QUOTA_MSG in r.stderr
        kept = int(small.commands.run("stat -c %s /big").stdout)
        assert 32 << 20 < kept <= 64 << 20  # it wrote up to its limit, not beyond
        assert write(other, "/big", 100).exit_code == 0  # a neighbour is not affected
        small.commands.run("rm /big && sync")  # freeing space gives the sandbox its room back
        assert write(small, "/again", 16).exit_code == 0

        # a fork inherits the parent's limit (and counts only what it writes itself)
        (child,) = small.fork()
        assert isinstance(child, Sandbox)
        try:
            assert child.info.disk_mb == 64
            r = write(child, "/big", 100)
            assert r.exit_code != 0 and QUOTA_MSG in r.stderr
            assert "again" in child.commands.run("ls /").stdout
        finally:
            gone(child)

        # a restore inherits the limit of the sandbox its snapshot was taken from, unless the create names one
        snap = small.create_snapshot()
        restored = Sandbox.create(snapshot=snap.snapshot_id, base_url=d.url, allow_internet_access=False)
        bigger = Sandbox.create(snapshot=snap.snapshot_id, disk_mb=128, base_url=d.url, allow_internet_access=False)
        try:
            assert restored.info.disk_mb == 64
            assert bigger.info.disk_mb == 128
            r = write(restored, "/big", 100)  # the restored files (a clone of the layer) are not charged again
            assert r.exit_code != 0 and QUOTA_MSG in r.stderr
            assert write(bigger, "/big", 100).exit_code == 0
        finally:
            gone(restored)
            gone(bigger)
    finally:
        gone(small)
        gone(other)


def test_disk_mb_bad_input_and_drivers_that_cannot_limit(
    btrfs_daemon: Callable[..., DaemonProc], daemon: DaemonProc
) -> None:
    d = btrfs_daemon()
    for bad in (0, 15, -1):
        with pytest.raises(BadRequestError, match="disk_mb"):
            Sandbox.create(base_url=d.url, disk_mb=bad)
    # the daemon on ext4 (overlay driver): an explicit limit is refused, and sandboxes show none
    with pytest.raises(NotSupportedError, match="btrfs"):
        Sandbox.create(base_url=daemon.url, disk_mb=64)
    sbx = Sandbox.create(base_url=daemon.url, allow_internet_access=False)
    try:
        assert sbx.info.disk_mb == 0
    finally:
        gone(sbx)


def health(d: DaemonProc) -> dict[str, Any]:
    r = httpx.get(d.url + "/health", timeout=10)
    assert r.status_code == 200  # the daemon answers whatever its disk
    body: dict[str, Any] = r.json()
    return body


def metric(d: DaemonProc, name: str) -> float:
    text = httpx.get(d.url + "/metrics", timeout=10).text
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def test_a_nearly_full_data_dir_keeps_the_reserve_refuses_new_work_and_recovers(
    btrfs_daemon: Callable[..., DaemonProc],
) -> None:
    d = btrfs_daemon(size_mb=320, config="reserve_mb = 64\n")
    assert health(d) == {"status": "ok"}
    filler = Sandbox.create(base_url=d.url, allow_internet_access=False)  # the default limit: above the fs size
    other = Sandbox.create(base_url=d.url, allow_internet_access=False)
    try:
        other.files.write("/note", "kept")
        r = write(filler, "/big", 400)
        assert r.exit_code != 0
        assert QUOTA_MSG in r.stderr  # the daemon's group limit stopped it, not a full filesystem
        st = os.statvfs(d.data_dir)
        assert st.f_bavail * st.f_frsize > 32 << 20  # the reserve is still there for the daemon's state

        # pressure shows, new work is refused with a clear error, and nothing else breaks
        h = health(d)
        assert h["status"] == "degraded" and "reserve_mb" in h["reasons"][0], h
        assert metric(d, "branchbox_disk_pressure") == 1
        assert metric(d, "branchbox_data_dir_reserve_bytes") == 64 << 20
        # most of the 320 MiB went to the filler; the gauge is the keeper's last refresh, which a scrape pokes
        deadline = time.monotonic() + 30
        while metric(d, "branchbox_sandboxes_disk_bytes") <= 128 << 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metric(d, "branchbox_sandboxes_disk_bytes") > 128 << 20
        with pytest.raises(DiskFullError, match="reserve_mb") as info:
            Sandbox.create(base_url=d.url, allow_internet_access=False)
        assert info.value.code == "disk_full" and info.value.status == 507
        with pytest.raises(DiskFullError):
            other.fork()
        with pytest.raises(DiskFullError):
            other.create_snapshot()
        assert other.commands.run("cat /note && echo ran").stdout == "keptran\n"
        assert other.files.read("/note") == "kept"
        assert {s.sandbox_id for s in Sandbox.list(base_url=d.url)} == {filler.sandbox_id, other.sandbox_id}
        with sqlite3.connect(f"file:{d.data_dir / 'state.db'}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

        # freeing space ends the pressure: creates work again
        filler.commands.run("rm -f /big && sync")
        deadline = time.monotonic() + 60  # btrfs frees extents at its next commit
        while health(d)["status"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health(d)["status"] == "ok"
        again = Sandbox.create(base_url=d.url, allow_internet_access=False)
        gone(again)
    finally:
        gone(filler)
        gone(other)


def test_snapshots_count_towards_the_daemons_snapshot_budget(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(config="snapshot_budget_mb = 8\n")  # the overlay driver: budgets work anywhere
    sbx = Sandbox.create(base_url=d.url, allow_internet_access=False)
    try:
        assert sbx.commands.run("head -c 12M /dev/urandom > /data").exit_code == 0
        first = sbx.create_snapshot()
        deadline = time.monotonic() + 60  # layers are measured in the background once snapshots pause
        while Sandbox.get_snapshot(first.snapshot_id, base_url=d.url).size_bytes is None:
            assert time.monotonic() < deadline, "the snapshot's layer was never measured"
            time.sleep(0.2)
        with pytest.raises(RateLimitError, match="snapshot_budget_mb") as info:
            sbx.create_snapshot()
        assert info.value.code == "limit_exceeded"
        assert [s.snapshot_id for s in Sandbox.snapshots(base_url=d.url)] == [first.snapshot_id]  # nothing made
        Sandbox.delete_snapshot(first.snapshot_id, base_url=d.url)
        Sandbox.delete_snapshot(sbx.create_snapshot().snapshot_id, base_url=d.url)  # room again
    finally:
        gone(sbx)


async def test_quotas_turned_on_next_to_a_daemon_without_them_change_nothing_for_it(default_template: Any) -> None:
    """Quotas are per filesystem: a daemon that turns them on where another one (here an embedded Manager that
    never does, as a daemon of an older version) keeps its data dir leaves that one's sandboxes, snapshots, forks
    and restores as they were, without limits."""
    fs = LoopFs(1024)
    daemon: DaemonProc | None = None
    try:
        old_dir = fs.mnt / f"data-{secrets.token_hex(4)}"
        old_dir.mkdir(mode=0o711)
        m = Manager(make_settings(old_dir), storage=BtrfsDriver(None))  # None: it never turns quotas on
        await m.start()
        try:
            assert quota.mode(fs.mnt) is None
            before = await m.create()
            assert before.resources.disk_mb == 0
            new_dir = fs.mnt / f"data-{secrets.token_hex(4)}"
            new_dir.mkdir(mode=0o711)
            daemon = DaemonProc(new_dir)
            await asyncio.to_thread(daemon.start)
            assert quota.mode(fs.mnt) == "squota"
            limited = await asyncio.to_thread(Sandbox.create, base_url=daemon.url, disk_mb=32)
            try:
                r = await asyncio.to_thread(write, limited, "/big", 64)
                assert r.exit_code != 0
                assert QUOTA_MSG in r.stderr
            finally:
                await asyncio.to_thread(gone, limited)
            # the neighbour: no limit on a sandbox made before or after, snapshots, forks and restores work
            after = await m.create()
            for sid in (before.id, after.id):
                r2 = await m.exec(sid, "head -c 100M /dev/zero > /big && sync /big && stat -c %s /big")
                assert r2.exit_code == 0, r2.stderr
                assert r2.stdout_text == f"{100 << 20}\n"
            snap = await m.snapshot(before.id)
            (child,) = await m.fork(before.id, 1)
            assert not isinstance(child, BaseException), child
            restored = await m.create(snapshot=snap.id)
            for sid in (child.id, restored.id):
                r3 = await m.exec(sid, "stat -c %s /big && head -c 50M /dev/zero > /more && sync /more")
                assert r3.exit_code == 0, r3.stderr
                assert r3.stdout_text == f"{100 << 20}\n"
            for sid in (before.id, after.id, child.id, restored.id):
                await m.destroy(sid)
        finally:
            await m.aclose()
    finally:
        try:
            if daemon is not None and daemon.proc is not None:
                await asyncio.to_thread(daemon.cleanup)
        finally:
            fs.remove()  # even when the daemon's cleanup failed
