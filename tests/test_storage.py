"""Storage drivers on real filesystems: frozen layers keep everything overlay needs; flattening follows
overlay's rules; btrfs subvolume ioctls. Needs root (device whiteouts, chown, loop mounts)."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchbox.backends.base import IdMap
from branchbox.errors import NotSupportedError
from branchbox.storage import btrfs
from branchbox.storage.base import StorageDriver
from branchbox.storage.btrfs import BtrfsDriver
from branchbox.storage.flatten import is_opaque, is_whiteout
from branchbox.storage.fsutil import BTRFS_SUPER_MAGIC, OPAQUE_XATTR, fs_type
from branchbox.storage.overlay import OverlayDriver
from branchbox.storage.prepare import image_path, prepare
from branchbox.storage.select import make_driver
from tests.conftest import TEST_ROOT
from tests.test_snapshots import btrfs_root  # noqa: F401 - the session's btrfs loop filesystem

pytestmark = [pytest.mark.root]


@pytest.fixture(params=["overlay", "btrfs"])
def drv(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[tuple[StorageDriver, Path]]:
    """A driver and a scratch dir on a filesystem it works on."""
    if request.param == "overlay":
        yield OverlayDriver(), data_dir
        return
    root: Path = request.getfixturevalue("btrfs_root")
    d = root / data_dir.name
    d.mkdir()
    driver = make_driver("auto", d)
    assert isinstance(driver, BtrfsDriver)
    try:
        yield driver, d
    finally:
        for p in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
            if btrfs.is_subvolume(p):
                btrfs.delete_subvolume(p)
        shutil.rmtree(d, ignore_errors=True)


def _populate(upper: Path) -> None:
    (upper / "dir").mkdir()
    os.chmod(upper / "dir", 0o1750)
    (upper / "dir" / "f").write_bytes(b"data")
    os.chown(upper / "dir" / "f", 101000, 101001)
    os.chmod(upper / "dir" / "f", 0o4711)
    os.link(upper / "dir" / "f", upper / "hard")
    os.symlink("dir/f", upper / "sym")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o000, 0)  # an overlay whiteout
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", OPAQUE_XATTR, b"y")
    os.setxattr(upper / "dir" / "f", "user.note", b"kept")
    os.utime(upper / "dir" / "f", ns=(1_000_000_000, 2_000_000_000))


def test_freeze_keeps_owners_modes_times_xattrs_links_whiteouts(drv: tuple[StorageDriver, Path]) -> None:
    driver, root = drv
    dirs = driver.prepare_sandbox(root / "sbx", IdMap())
    assert dirs.upper == driver.upper_dir(root / "sbx")
    assert os.stat(dirs.upper).st_uid == 100000 and os.stat(dirs.work).st_uid == 100000
    _populate(dirs.upper)
    (root / "layers").mkdir()
    layer = driver.freeze_upper(dirs.upper, root / "layers" / "L")
    low = driver.layer_lower(layer.path)
    f = os.lstat(low / "dir" / "f")
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode), f.st_mtime_ns) == (101000, 101001, 0o4711, 2_000_000_000)
    assert (low / "dir" / "f").read_bytes() == b"data"
    assert os.getxattr(low / "dir" / "f", "user.note") == b"kept"
    assert stat.S_IMODE(os.lstat(low / "dir").st_mode) == 0o1750
    assert os.lstat(low / "hard").st_ino == f.st_ino  # hard links stay links
    assert os.readlink(low / "sym") == "dir/f"
    assert is_whiteout(os.lstat(low / "gone")) and is_opaque(str(low / "opq"))
    # the layer is independent of the upper that goes on changing
    (dirs.upper / "dir" / "f").write_bytes(b"changed")
    (dirs.upper / "new").write_bytes(b"n")
    assert (low / "dir" / "f").read_bytes() == b"data" and not (low / "new").exists()
    # a clone-restore (or a copy) starts a new upper with the layer's content
    child = driver.prepare_sandbox(root / "child", IdMap(), base=layer.path)
    assert (child.upper / "dir" / "f").read_bytes() == b"data"
    (child.upper / "dir" / "f").write_bytes(b"child")
    assert (low / "dir" / "f").read_bytes() == b"data"
    usage = driver.disk_usage(layer.path)
    assert usage.files is not None and usage.files >= 6 and usage.size_bytes is not None and usage.size_bytes > 0
    driver.remove_sandbox(root / "sbx")
    driver.remove_sandbox(root / "child")
    driver.remove_layer(layer.path)
    driver.remove_layer(layer.path)  # missing is fine
    assert not (root / "sbx").exists() and not (root / "child").exists() and not layer.path.exists()


def test_flatten_follows_overlay_rules(drv: tuple[StorageDriver, Path]) -> None:
    driver, root = drv
    bottom, mid, top = (root / n for n in ("bottom", "mid", "top"))
    for d in (bottom, mid, top):
        d.mkdir()
    # bottom: files and dirs
    (bottom / "a").write_text("a0")
    (bottom / "d").mkdir()
    (bottom / "d" / "x").write_text("x0")
    (bottom / "d" / "y").write_text("y0")
    (bottom / "o").mkdir()
    (bottom / "o" / "old").write_text("old")
    (bottom / "f2d").write_text("file")
    # mid: whiteout a, delete d/x, opaque o, replace a file by a dir
    os.mknod(mid / "a", stat.S_IFCHR, 0)
    (mid / "d").mkdir()
    os.mknod(mid / "d" / "x", stat.S_IFCHR, 0)
    (mid / "o").mkdir()
    os.setxattr(mid / "o", OPAQUE_XATTR, b"y")
    (mid / "o" / "new").write_text("new")
    (mid / "f2d").mkdir()
    (mid / "f2d" / "in").write_text("in")
    os.mknod(mid / "tplgone", stat.S_IFCHR, 0)  # hides a template file further down
    # top: re-create a, change a dir's mode, add to d
    (top / "a").write_text("a2")
    (top / "d").mkdir()
    os.chmod(top / "d", 0o700)
    (top / "d" / "z").write_text("z2")
    layer = driver.flatten([top, mid, bottom], root / "flat")
    out = driver.layer_lower(layer.path)
    assert (out / "a").read_text() == "a2"
    assert is_whiteout(os.lstat(out / "d" / "x")) and (out / "d" / "y").read_text() == "y0"
    assert (out / "d" / "z").read_text() == "z2" and stat.S_IMODE(os.stat(out / "d").st_mode) == 0o700
    assert sorted(os.listdir(out / "o")) == ["new"] and is_opaque(str(out / "o"))
    assert os.listdir(out / "f2d") == ["in"] and is_opaque(str(out / "f2d"))  # would merge with a template dir
    assert is_whiteout(os.lstat(out / "tplgone"))
    assert not is_opaque(str(out / "d"))
    assert layer.files is not None and layer.files > 0
    driver.remove_layer(layer.path)
    assert not layer.path.exists()


def test_make_driver_picks_by_filesystem(data_dir: Path) -> None:
    assert make_driver("auto", data_dir).name == "overlay"
    assert make_driver("overlay", data_dir).name == "overlay"
    with pytest.raises(NotSupportedError):
        make_driver("btrfs", data_dir)
    with pytest.raises(NotSupportedError):
        make_driver("zfs", data_dir)


def test_btrfs_snapshot_ioctls(btrfs_root: Path) -> None:  # noqa: F811
    vol = btrfs_root / "vol-test"
    snap = btrfs_root / "vol-test-ro"
    try:
        btrfs.create_subvolume(vol)
        assert btrfs.is_subvolume(vol) and not btrfs.is_subvolume(btrfs_root / "nope")
        (vol / "f").write_text("1")
        btrfs.snapshot(vol, snap, readonly=True)
        (vol / "f").write_text("2")
        assert (snap / "f").read_text() == "1"
        with pytest.raises(OSError):
            (snap / "g").write_text("x")
    finally:
        btrfs.delete_subvolume(snap)
        btrfs.delete_subvolume(vol)
    assert not vol.exists() and not snap.exists()


@pytest.fixture
def fresh_data_dir() -> Iterator[Path]:
    """A data dir path that does not exist yet; whatever ``prepare`` mounts there is unmounted afterwards."""
    d = TEST_ROOT / f"prep-{secrets.token_hex(4)}"
    try:
        yield d
    finally:
        if d.is_dir() and fs_type(d) == BTRFS_SUPER_MAGIC:
            subprocess.run(["umount", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)
        image_path(d).unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="mkfs.btrfs is missing: apt-get install btrfs-progs")
def test_prepare_gives_a_fresh_data_dir_btrfs_and_mounts_it_again(fresh_data_dir: Path) -> None:
    first = prepare(fresh_data_dir, size_gb=1)
    assert first.action == "created"
    assert fs_type(fresh_data_dir) == BTRFS_SUPER_MAGIC
    assert make_driver("auto", fresh_data_dir).name == "btrfs"
    assert os.stat(image_path(fresh_data_dir)).st_blocks * 512 < 1 << 30  # sparse
    assert prepare(fresh_data_dir).action == "already-btrfs"  # idempotent
    subprocess.run(["umount", str(fresh_data_dir)], check=True)  # as after a reboot
    assert prepare(fresh_data_dir).action == "mounted"
    assert fs_type(fresh_data_dir) == BTRFS_SUPER_MAGIC


def test_prepare_keeps_a_data_dir_that_holds_data(fresh_data_dir: Path) -> None:
    fresh_data_dir.mkdir(parents=True)
    (fresh_data_dir / "state.db").write_bytes(b"x")
    done = prepare(fresh_data_dir, size_gb=1)
    assert done.action == "kept-existing-data"
    assert "move" in done.message  # says what to do for snapshots in O(1)
    assert not image_path(fresh_data_dir).exists()
    assert (fresh_data_dir / "state.db").read_bytes() == b"x"


def test_the_overlay_driver_refuses_a_disk_limit_with_the_api_error(tmp_path: Path) -> None:
    """core never asks it (its disk_limits is None); an embedder who does gets not_supported, as API callers do."""
    driver = OverlayDriver()
    assert driver.disk_limits is None
    with pytest.raises(NotSupportedError, match="btrfs") as info:
        driver.set_disk_limit(tmp_path, 64)
    assert info.value.code == "not_supported"
