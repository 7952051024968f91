"""Issue 25, "any image runs": templates without Python (busybox-only, shell-less) in containers and microVMs,
through the SDK against a real daemon. The images come from tests/rootfs_fixtures.py."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

from tests.rootfs_fixtures import APP_UID


def test_busybox_rootfs_fixture(busybox_rootfs: Path, busybox_rootfs_tar: Path) -> None:
    """The fixture's rootfs is busybox only: a shell and applets, users root and app, no python, no libc."""
    assert os.readlink(busybox_rootfs / "bin/sh") == "busybox"
    assert (busybox_rootfs / "usr/bin/env").resolve() == (busybox_rootfs / "bin/busybox").resolve()
    assert not list(busybox_rootfs.rglob("python*"))
    assert not list(busybox_rootfs.rglob("*.so*")), "a static busybox needs no shared library"
    assert "app:x:1000:1000:app:/home/app:/bin/sh" in (busybox_rootfs / "etc/passwd").read_text()
    assert (busybox_rootfs / "home/app").stat().st_uid == APP_UID
    assert (busybox_rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    # the shell in the tree runs (chroot: the applet symlinks resolve inside the rootfs)
    out = subprocess.run(
        ["chroot", str(busybox_rootfs), "/bin/sh", "-c", "echo $((6*7)); id -un"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["42", "root"]
    with tarfile.open(busybox_rootfs_tar) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["./bin/sh"].issym() and members["./bin/sh"].linkname == "busybox"
    assert members["./home/app"].uid == APP_UID and members["./home/app"].uname == ""
    assert members["./bin/busybox"].mode & 0o111
