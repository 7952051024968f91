"""Snapshots, restores, forks and resets on the real container backend, for both storage drivers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import branchbox
from branchbox import errors
from branchbox.core import snapshots as snaps
from branchbox.core.manager import Manager
from branchbox.models import SandboxInfo, SandboxState, TemplateInfo
from branchbox.sdk import AsyncSandbox, NotFoundError, RateLimitError, Sandbox, SandboxError, aexplore
from branchbox.sdk import BadRequestError as SdkBadRequest
from tests.conftest import TEST_ROOT, DaemonProc, make_settings
from tests.test_cli import bb

pytestmark = [pytest.mark.root, pytest.mark.template]


@pytest.fixture(scope="session")
def btrfs_root() -> Iterator[Path]:
    """A btrfs filesystem on a loop device for the whole session; always unmounted and detached."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("mkfs.btrfs is missing: apt-get install btrfs-progs")
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    tag = f"btrfs-{os.getpid()}-{secrets.token_hex(3)}"  # one per module that uses it
    img = TEST_ROOT / f"{tag}.img"
    mnt = TEST_ROOT / tag
    mnt.mkdir(exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(4 << 30)
    mounted = False
    try:
        subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True, capture_output=True)
        mounted = True  # mount -o loop sets autoclear: unmounting detaches the loop device
        os.chmod(mnt, 0o711)
        yield mnt
    finally:
        if mounted and subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # detaches once the last user is gone
        mnt.rmdir()
        img.unlink()


@pytest.fixture(params=["overlay", "btrfs"])
def driver_data_dir(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Path]:
    """A fresh data dir on ext4 (overlay driver) or on the session's btrfs (btrfs driver)."""
    if request.param == "overlay":
        yield data_dir
        return
    root: Path = request.getfixturevalue("btrfs_root")
    d = root / data_dir.name
    d.mkdir(mode=0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)  # a failed test may leave subvolumes: remove them as dirs


@pytest.fixture
async def m(default_template: TemplateInfo, driver_data_dir: Path) -> AsyncIterator[Manager]:
    async with Manager.open(make_settings(driver_data_dir)) as mgr:
        expected = "btrfs" if driver_data_dir.is_relative_to(TEST_ROOT) and "btrfs-" in str(driver_data_dir) else None
        assert mgr.storage_driver == (expected or "overlay")
        yield mgr
        await mgr.wait_background()


async def sh(m: Manager, sid: str, cmd: str) -> str:
    r = await m.exec(sid, ["sh", "-c", cmd])
    assert r.exit_code == 0, (cmd, r.stderr)
    return r.stdout_text


STATE = (
    "cd /work && for f in a.txt run.sh d/e/f sub/link; do [ -e $f ] || [ -L $f ] && stat -c '%n %a %u:%g %s %F' $f;"
    " done; cat a.txt d/e/f; readlink sub/link; ls /etc/issue 2>&1 || true"
)


async def make_state(m: Manager, sid: str) -> str:
    await sh(m, sid, "mkdir -p /work/d/e /work/sub && printf 'alpha' > /work/a.txt && chmod 640 /work/a.txt"
                     " && printf '#!/bin/sh\\necho hi\\n' > /work/run.sh && chmod 755 /work/run.sh"
                     " && printf 'deep' > /work/d/e/f && chown 1000:1000 /work/d/e/f && ln -s ../a.txt /work/sub/link"
                     " && rm /etc/issue")  # fmt: skip
    return await sh(m, sid, STATE)


async def test_snapshot_change_restore_exact(m: Manager) -> None:
    a = await m.create()
    before = await make_state(m, a.id)
    assert "a.txt 640 0:0 5" in before and "d/e/f 644 1000:1000 4" in before and "No such file" in before
    snap = await m.snapshot(a.id, name="after-setup")
    assert snap.name == "after-setup" and snap.sandbox_id == a.id and snap.driver == m.storage_driver
    assert {"freeze", "capture", "thaw", "store"} <= set(snap.timings)
    assert (await m.get(a.id)).state is SandboxState.RUNNING  # thawed, still running
    await sh(m, a.id, "printf changed > /work/a.txt && chmod 600 /work/a.txt && rm /work/run.sh && rm -r /work/d"
                      " && echo new > /work/new && echo back > /etc/issue")  # fmt: skip
    b = await m.create(snapshot="after-setup")
    assert b.source == "snapshot" and b.id != a.id and b.hostname != a.hostname
    assert await sh(m, b.id, STATE) == before
    assert (await m.exec(b.id, ["test", "-e", "/work/new"])).exit_code == 1
    assert await sh(m, b.id, "/work/run.sh") == "hi\n"
    # the source kept its own changes, and the restore has its own machine-id
    assert await sh(m, a.id, "cat /work/a.txt /etc/issue") == "changedback\n"
    assert await sh(m, b.id, "cat /etc/machine-id") != await sh(m, a.id, "cat /etc/machine-id 2>/dev/null || true")
    assert [s.id for s in await m.list_snapshots()] == [snap.id]
    assert (await m.get_snapshot(snap.id)).name == "after-setup"
    await m.wait_background()
    assert (await m.get_snapshot("after-setup")).size_bytes is not None


async def test_snapshot_of_paused_sandbox_stays_paused(m: Manager) -> None:
    a = await m.create()
    await sh(m, a.id, "echo 1 > /work/x")
    await m.pause(a.id)
    snap = await m.snapshot(a.id)
    assert (await m.get(a.id)).state is SandboxState.PAUSED
    assert "freeze" in snap.timings and "thaw" not in snap.timings
    await m.resume(a.id)
    b = await m.create(snapshot=snap.id)
    assert await sh(m, b.id, "cat /work/x") == "1\n"


async def test_forks_diverge_and_do_not_copy_processes(m: Manager) -> None:
    a = await m.create(env={"K": "v"}, metadata={"task": "t"})
    await sh(m, a.id, "echo base > /work/base")
    bg = await m.spawn(a.id, ["sleep", "1000"], tag="bg")
    kids = await m.fork(a.id, count=3)
    assert all(isinstance(k, SandboxInfo) for k in kids), kids
    infos = [k for k in kids if isinstance(k, SandboxInfo)]
    assert len({k.id for k in infos} | {a.id}) == 4 and len({k.hostname for k in infos} | {a.hostname}) == 4
    assert all(k.source == "fork" and k.env == {"K": "v"} and k.metadata == {"task": "t"} for k in infos)
    await asyncio.gather(*(sh(m, k.id, f"echo {k.id} > /work/mine && rm /work/base") for k in infos))
    for k in infos:
        assert await sh(m, k.id, "cat /work/mine; ls /work") == f"{k.id}\nmine\n"
        assert all(p.tag != "bg" for p in await m.list_processes(k.id))  # filesystem-only fork
        assert await sh(m, k.id, "cat /etc/hostname; getent hosts $(hostname)") == (
            f"{k.hostname}\n127.0.1.1       {k.hostname}\n"
        )  # its own name, not the parent's copied files
    assert await sh(m, a.id, "ls /work") == "base\n"
    ids = {await sh(m, k.id, "cat /etc/machine-id") for k in infos}
    assert len(ids) == 3
    assert await m.list_snapshots() == []  # the fork's snapshot is hidden and gone
    await m.kill_process(a.id, bg.pid)


async def test_fork_tree_depth_6(m: Manager) -> None:
    cur = await m.create()
    chain = [cur.id]
    for level in range(6):
        await sh(m, cur.id, f"echo {level} > /work/l{level} && rm -f /work/l{level - 2}")
        (kid,) = await m.fork(cur.id, count=1)
        assert isinstance(kid, SandboxInfo), kid
        cur = kid
        chain.append(cur.id)
    assert await sh(m, cur.id, "ls /work") == "l4\nl5\n"
    for i, sid in enumerate(chain[:-1]):  # every ancestor still sees exactly its own state
        expect = [f"l{j}" for j in range(max(0, i - 1), i + 1)]
        assert (await sh(m, sid, "ls /work")).split() == expect


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
async def test_delete_snapshots_in_any_order_children_live(m: Manager, order: tuple[int, ...]) -> None:
    a = await m.create()
    kids: list[SandboxInfo] = []
    snap_ids: list[str] = []
    cur = a
    for level in range(3):
        await sh(m, cur.id, f"echo {level} > /work/s{level}")
        snap = await m.snapshot(cur.id, name=f"s{level}")
        snap_ids.append(snap.id)
        cur = await m.create(snapshot=snap.id)
        kids.append(cur)
    for i in order:
        await m.delete_snapshot(snap_ids[i])
        await m.wait_background()
        for level, k in enumerate(kids):  # each kid but the last wrote the next level's file itself
            assert (await sh(m, k.id, "cat /work/s*")).split() == [str(j) for j in range(min(level + 2, 3))]
    assert await m.list_snapshots() == []
    with pytest.raises(errors.SnapshotNotFoundError):
        await m.create(snapshot=snap_ids[0])
    for k in [*kids, a]:
        await m.destroy(k.id)
    await m.wait_background()
    assert list((m.settings.data_dir / "layers").iterdir()) == []  # every layer freed


async def test_reset_to_template_and_to_snapshot(m: Manager) -> None:
    a = await m.create(env={"K": "v"}, hostname="keepme")
    await sh(m, a.id, "echo one > /work/f")
    snap = await m.snapshot(a.id, name="one")
    await sh(m, a.id, "echo two > /work/f && echo x > /work/g")
    r = await m.reset(a.id)
    assert r.id == a.id and r.state is SandboxState.RUNNING and r.hostname == "keepme"
    assert await sh(m, a.id, "ls /work; hostname; echo $K") == "keepme\nv\n"
    r = await m.reset(a.id, snapshot=snap.name)
    assert await sh(m, a.id, "ls /work; cat /work/f") == "f\none\n"
    with pytest.raises(errors.SnapshotNotFoundError):
        await m.reset(a.id, snapshot="nope")
    assert await sh(m, a.id, "cat /work/f") == "one\n"  # a bad reset changed nothing
    assert [s.id for s in await m.list()] == [a.id]


@pytest.fixture
async def overlay_m(default_template: TemplateInfo, data_dir: Path) -> AsyncIterator[Manager]:
    """The overlay driver only: btrfs restores clone the top layer, so its chains never grow (its flatten is
    tested in test_storage)."""
    async with Manager.open(make_settings(data_dir)) as mgr:
        assert mgr.storage_driver == "overlay"
        yield mgr


async def test_flatten_deep_chain(overlay_m: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chains deeper than the limit get one flat layer: same files, whiteouts and opaque dirs as the chain."""
    m = overlay_m
    monkeypatch.setattr(snaps, "FLATTEN_DEPTH", 2)
    cur = await m.create()
    steps = [
        "mkdir -p /work/d/x && echo 1 > /work/d/x/f && echo k > /work/keep && echo 1 > /work/hl"
        " && ln /work/hl /work/hl2",
        "rm -r /work/d && mkdir -p /work/d && echo 2 > /work/d/g && rm /etc/issue && chmod 700 /work",
        "echo 3 > /work/d/h && rm /work/keep && mkdir /etc/issue && echo dir > /etc/issue/now && rm -r /usr/share/doc",
        "echo 4 > /work/keep && rm /work/d/g && mkdir -p /usr/share/doc/new && echo n > /usr/share/doc/new/f",
    ]
    snap = None
    for step in steps:
        await sh(m, cur.id, step)
        snap = await m.snapshot(cur.id)
        cur = await m.create(snapshot=snap.id)
    assert snap is not None and len(snap.layers) == 4
    probe = ("cd /; stat -c '%n %a %U' /work; find /work /etc/issue /usr/share/doc | sort | xargs -d '\\n' ls -ld"
             " | awk '{print $1, $3, $9}'; cat /work/keep /work/d/h /etc/issue/now /usr/share/doc/new/f")  # fmt: skip
    expected = await sh(m, cur.id, probe)
    assert "/work/d/x" not in expected and "/usr/share/doc/new/f" in expected
    await m.wait_background()
    flat = await m.get_snapshot(snap.id)
    assert len(flat.layers) == 1 and flat.layers[0] not in snap.layers
    b = await m.create(snapshot=snap.id)
    assert await sh(m, b.id, probe) == expected
    assert await sh(m, cur.id, probe) == expected  # the child on the old chain still works


async def test_restart_recovers_snapshot_trees(default_template: TemplateInfo, driver_data_dir: Path) -> None:
    settings = make_settings(driver_data_dir, keep_sandboxes_on_shutdown=True)
    async with Manager.open(settings) as m1:
        a = await m1.create()
        await sh(m1, a.id, "echo root > /work/r")
        s1 = await m1.snapshot(a.id, name="root")
        b = await m1.create(snapshot=s1.id)
        await sh(m1, b.id, "echo kid > /work/k")
        (c,) = await m1.fork(b.id, count=1)
        assert isinstance(c, SandboxInfo)
        s2 = await m1.snapshot(c.id, name="grandkid")
        await m1.wait_background()
    async with Manager.open(make_settings(driver_data_dir)) as m2:  # destroys everything when closed
        assert {s.name for s in await m2.list_snapshots()} == {"root", "grandkid"}
        assert (await m2.get_snapshot("grandkid")).layers == s2.layers
        for sid in (a.id, b.id, c.id):
            assert (await m2.get(sid)).state is SandboxState.RUNNING
        assert await sh(m2, c.id, "cat /work/r /work/k") == "root\nkid\n"
        d = await m2.create(snapshot="grandkid")
        assert await sh(m2, d.id, "cat /work/r /work/k") == "root\nkid\n"
        await m2.reset(c.id, snapshot="root")
        assert await sh(m2, c.id, "ls /work") == "r\n"


async def test_bad_input_gives_typed_errors(m: Manager) -> None:
    a = await m.create()
    await m.snapshot(a.id, name="taken")
    with pytest.raises(errors.SnapshotNotFoundError):
        await m.create(snapshot="no-such-snapshot")
    with pytest.raises(errors.SnapshotNotFoundError):
        await m.get_snapshot("snap-0000")
    with pytest.raises(errors.SnapshotNotFoundError):
        await m.delete_snapshot("no-such-snapshot")
    with pytest.raises(errors.ConflictError):
        await m.snapshot(a.id, name="taken")
    with pytest.raises(errors.BadRequestError):
        await m.snapshot(a.id, name="bad name!")
    with pytest.raises(errors.BadRequestError):
        await m.fork(a.id, count=0)
    with pytest.raises(errors.LimitExceededError):
        await m.fork(a.id, count=10_000)
    with pytest.raises(errors.SandboxNotFoundError):
        await m.snapshot("0" * 20)
    await m.destroy(a.id)
    with pytest.raises(errors.SandboxNotFoundError):
        await m.fork(a.id, count=2)
    assert [s.name for s in await m.list_snapshots()] == ["taken"]
    assert await m.list() == []


@pytest.mark.slow
async def test_20k_file_workspace_snapshot_and_16_way_fork(m: Manager) -> None:
    a = await m.create(memory_mb=1024)
    await sh(m, a.id, "python3 -c \"import os\nfor i in range(200):\n d=f'/work/t/{i}'; os.makedirs(d)\n"
                      " for j in range(100):\n  open(f'{d}/{j}.py','w').write(str(i*j))\"")  # fmt: skip
    snap = await m.snapshot(a.id)
    kids = await m.fork(a.id, count=16)
    infos = [k for k in kids if isinstance(k, SandboxInfo)]
    assert len(infos) == 16, kids
    counts = await asyncio.gather(*(sh(m, k.id, "find /work/t -type f | wc -l; cat /work/t/7/9.py") for k in infos))
    assert set(counts) == {"20000\n63"}
    b = await m.create(snapshot=snap.id)
    await sh(m, b.id, "rm -r /work/t/3")
    assert await sh(m, a.id, "find /work/t -type f | wc -l") == "20000\n"


# ------------------------------------------------------------------ over HTTP: SDK (sync + async) and CLI


def test_sdk_snapshot_restore_fork_explore_reset(daemon: DaemonProc) -> None:
    url = daemon.url
    with Sandbox.create(base_url=url) as sbx:
        sbx.files.write("/work/setup.txt", "ready")
        snap = sbx.create_snapshot(name="after-setup")
        assert snap.name == "after-setup" and snap.sandbox_id == sbx.sandbox_id and snap.layers
        assert [s.snapshot_id for s in Sandbox.snapshots(base_url=url)] == [snap.snapshot_id]
        assert Sandbox.get_snapshot("after-setup", base_url=url).snapshot_id == snap.snapshot_id
        with Sandbox.create(snapshot="after-setup", base_url=url) as b:
            assert b.info.source == "snapshot"
            assert b.files.read("/work/setup.txt") == "ready"
        kids = sbx.fork(count=2)
        assert all(isinstance(k, Sandbox) for k in kids), kids
        for k in kids:
            assert isinstance(k, Sandbox)
            assert k.info.source == "fork" and k.files.read("/work/setup.txt") == "ready"
            k.kill()
            k.close()
        results = branchbox.explore(sbx, ["cat /work/setup.txt", "echo b > /work/setup.txt; cat /work/setup.txt"])
        assert [r.stdout for r in results if not isinstance(r, SandboxError)] == ["ready", "b\n"]
        assert sbx.files.read("/work/setup.txt") == "ready"  # explorations do not touch the source
        sbx.files.write("/work/later.txt", "x")
        sbx.reset("after-setup")
        assert not sbx.files.exists("/work/later.txt") and sbx.files.read("/work/setup.txt") == "ready"
        sbx.reset()
        assert not sbx.files.exists("/work/setup.txt")
        with pytest.raises(SdkBadRequest):
            sbx.fork(count=0)
        with pytest.raises(RateLimitError):
            sbx.fork(count=10_000)
        with pytest.raises(NotFoundError) as info:
            Sandbox.create(snapshot="nope", base_url=url)
        assert info.value.code == "snapshot_not_found"
        Sandbox.delete_snapshot("after-setup", base_url=url)
        assert Sandbox.snapshots(base_url=url) == []


async def test_async_sdk_fork_and_aexplore(daemon: DaemonProc) -> None:
    sbx = await AsyncSandbox.create(base_url=daemon.url)
    async with sbx:
        await sbx.files.write("/work/a", "1")
        snap = await sbx.create_snapshot()
        assert (await AsyncSandbox.get_snapshot(snap.snapshot_id, base_url=daemon.url)).name is None
        (kid,) = await sbx.fork(count=1)
        assert not isinstance(kid, SandboxError)
        async with kid:
            assert await kid.files.read("/work/a") == "1"
        results = await aexplore(sbx, ["cat /work/a", "exit 3"])
        assert [(r.exit_code, r.stdout) for r in results if not isinstance(r, SandboxError)] == [(0, "1"), (3, "")]
        await sbx.reset(snap.snapshot_id)
        await AsyncSandbox.delete_snapshot(snap.snapshot_id, base_url=daemon.url)


def test_cli_snapshot_fork_restore(daemon: DaemonProc) -> None:
    url = daemon.url
    sid = bb("create", url=url).stdout.strip()
    assert bb("exec", sid, "sh", "-c", "echo hi > /work/f", url=url).returncode == 0
    made = bb("snapshot", "create", sid, "--name", "cli-snap", url=url)
    assert made.returncode == 0, made.stderr
    listed = bb("snapshot", "ls", "--json", url=url)
    assert [s["name"] for s in json.loads(listed.stdout)] == ["cli-snap"]
    forked = bb("fork", sid, "-n", "2", url=url)
    assert forked.returncode == 0, forked.stderr
    assert len(forked.stdout.split()) == 2
    restored = bb("restore", "cli-snap", url=url)
    assert restored.returncode == 0, restored.stderr
    assert bb("exec", restored.stdout.strip(), "cat", "/work/f", url=url).stdout == "hi\n"
    assert bb("exec", sid, "echo changed > /work/f", url=url).returncode == 0
    for argv in (["cli-snap"], ["-s", "cli-snap"]):  # the snapshot as an argument, as sbx.reset(snap), or -s
        assert bb("reset", sid, *argv, url=url).returncode == 0
        assert bb("exec", sid, "cat /work/f; echo changed > /work/f", url=url).stdout == "hi\n"
    assert bb("reset", sid, "a", "-s", "b", url=url).returncode == 2
    gone = bb("snapshot", "rm", "cli-snap", url=url)
    assert gone.returncode == 0, gone.stderr
    again = bb("snapshot", "rm", "cli-snap", url=url)
    assert again.returncode == 1 and "snapshot_not_found" in again.stderr
