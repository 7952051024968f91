"""Pieces of the microVM backend that need no VM: sparse RAM copies, module ordering, the initrd archive."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from branchbox.backends.microvm import image, memfile, tplcache
from branchbox.errors import BackendError


@pytest.mark.parametrize("where", ["/dev/shm", "/var/tmp"])
def test_sparse_copy_copies_data_and_keeps_holes(tmp_path: Path, where: str) -> None:
    src = Path("/dev/shm") / f"bbtest-src-{os.getpid()}"
    dst = Path(where) / f"bbtest-dst-{os.getpid()}"
    try:
        with open(src, "wb") as f:
            f.truncate(64 << 20)
            f.seek(1 << 20)
            f.write(b"a" * 8192)
            f.seek(40 << 20)
            f.write(b"b" * 4096)
        copied = memfile.sparse_copy(src, dst)
        assert dst.stat().st_size == 64 << 20
        assert src.read_bytes() == dst.read_bytes()
        assert copied < 1 << 20  # only the data, not 64 MiB
        assert dst.stat().st_blocks * 512 < 4 << 20  # the holes stay holes
    finally:
        memfile.remove(src)
        memfile.remove(dst)


def _ko(depends: str) -> bytes:
    return b"\x7fELF....\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0"


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    mods = {"virtio": "", "virtio_ring": "", "virtio_mmio": "virtio,virtio_ring", "virtio_blk": "virtio,virtio_ring"}
    for name, deps in mods.items():
        (tmp_path / f"{name.replace('_', '-')}.ko").write_bytes(_ko(deps))
    index = image._index_modules(tmp_path)
    order = image.module_order(("virtio_mmio", "virtio_blk"), index)
    assert order.index("virtio") < order.index("virtio_mmio")
    assert order.index("virtio_ring") < order.index("virtio_blk")
    assert sorted(order) == sorted(mods)
    with pytest.raises(BackendError, match="not in the kernel package"):
        image.module_order(("vsock",), index)


def test_decompress_refuses_a_kernel_without_lz4() -> None:
    with pytest.raises(BackendError, match="LZ4"):
        image.decompress_vmlinuz(b"MZ" + b"\0" * 4096)


@pytest.mark.skipif(not shutil.which("cpio"), reason="cpio is not installed (make apt installs it)")
def test_newc_archive_lists_with_cpio(tmp_path: Path) -> None:
    data = image._newc("dev", 0o040755, ino=1) + image._newc("dev/console", 0o020600, rdev=(5, 1), ino=2)
    data += image._newc("init", 0o100755, b"#!/bin/sh\necho hi\n", ino=3) + image._newc("TRAILER!!!", 0)
    out = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True).stdout.decode()
    assert "dev/console" in out and "init" in out
    assert out.splitlines()[1].startswith("crw")


def _register_and_leave(cache: Path, base: Path, rounds: int) -> None:
    """One daemon after another on a shared cache: register a data dir, remove it, list the users."""
    for _ in range(rounds):
        d = Path(tempfile.mkdtemp(dir=base))
        tplcache.register_user(cache, d)
        shutil.rmtree(d)
        tplcache.users(cache)  # drops stale registrations, which the other process may be dropping too


def test_daemons_sharing_a_cache_register_concurrently(tmp_path: Path) -> None:
    """Two processes registering and dropping data dirs at once never fail (a link removed by the other between
    the listing and its readlink raised FileNotFoundError, which failed a daemon's create with an OSError)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    ctx = multiprocessing.get_context("spawn")  # no fork of a test process with threads
    procs = [ctx.Process(target=_register_and_leave, args=(cache, tmp_path, 500)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert tplcache.users(cache) == []


def test_a_new_guest_image_drops_the_old_memory_templates_of_the_same_shape(tmp_path: Path) -> None:
    key = "94b1fbd43872ef55-tcg-1c-256m-newimage"
    names = [
        f"{key}-aaaa.ram",  # the current one
        "94b1fbd43872ef55-tcg-1c-256m-oldimage-bbbb.ram",  # same template and shape, older guest image
        "94b1fbd43872ef55-tcg-1c-512m-oldimage-cccc.ram",  # another memory size: still used
        "0123456789abcdef-tcg-1c-256m-oldimage-dddd.ram",  # another template
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    gone = memfile.remove_stale_templates(tmp_path, key)
    assert [g.name for g in gone] == [names[1]]
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([names[0], names[2], names[3]])


def _qcow2(path: Path, backing: Path | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    argv += ["-F", "qcow2", "-b", str(backing)] if backing is not None else []
    subprocess.run([*argv, str(path), "16M"], check=True)


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img is not installed (make apt: qemu-utils)")
def test_old_memory_template_disks_go_when_nothing_uses_them(tmp_path: Path) -> None:
    cache, shm, data, gone_data = tmp_path / "cache", tmp_path / "shm", tmp_path / "data", tmp_path / "gone"
    for d in (shm, data, gone_data):
        d.mkdir()
    mt = tplcache.root(cache)
    live, pinned, held, old = mt / "k1" / "g1", mt / "k1" / "g0", mt / "k2" / "g2", mt / "k3" / "g3"
    for g in (live, pinned, held, old):
        _qcow2(g / "disk.qcow2")
        (g / "state").write_bytes(b"s")
    (mt / "k3" / "current").symlink_to("g3")
    building = mt / "k1" / ".g4.tpl-1"
    building.mkdir()
    (shm / "k1-g1.ram").write_bytes(b"r")  # the only generation a VM can still start from
    # a memory snapshot of a VM restored from k1/g0: layer -> layer -> template disk
    _qcow2(data / "layers" / "a" / "disk.qcow2", pinned / "disk.qcow2")
    _qcow2(data / "layers" / "b" / "disk.qcow2", data / "layers" / "a" / "disk.qcow2")
    tplcache.register_user(cache, data)
    tplcache.register_user(cache, data)  # idempotent
    tplcache.register_user(cache, gone_data)
    gone_data.rmdir()
    with open(held / "disk.qcow2", "rb"):  # as a running QEMU holds its overlay's backing file
        assert tplcache.sweep(cache, shm) == []  # the first sweep only marks: something may be starting on it
        assert (old / tplcache.UNUSED).is_file() and not (held / tplcache.UNUSED).exists()
        removed = tplcache.sweep(cache, shm, grace_s=0)
        assert removed == [old]
        assert held.is_dir()
    assert not (mt / "k3").exists()  # nothing left of that key, its current link included
    assert live.is_dir() and pinned.is_dir() and building.is_dir()
    assert tplcache.users(cache) == [data]  # the removed data dir's registration is gone
    assert len(list((mt / ".users").iterdir())) == 1
    assert tplcache.sweep(cache, shm, grace_s=0) == [held]
    for layer in ("a", "b"):  # the snapshot's chain stays whole
        subprocess.run(["qemu-img", "info", "--backing-chain", str(data / "layers" / layer / "disk.qcow2")],
                       check=True, capture_output=True)  # fmt: skip
    assert tplcache.backing_file(data / "layers" / "b" / "disk.qcow2") == data / "layers" / "a" / "disk.qcow2"
    assert tplcache.backing_file(live / "state") is None
