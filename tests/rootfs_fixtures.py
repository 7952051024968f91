"""Images the tests build themselves: a busybox-only root filesystem (issue 25's "any image runs").

The rootfs holds Debian's static busybox (package ``busybox-static``, installed by ``make``) at ``/bin/busybox``,
a relative symlink for each of its applets (``/bin/sh``, ``/bin/ls``, ``/usr/bin/env``, ...), a minimal
``/etc/passwd`` and ``/etc/group`` (``root`` and ``app``, uid/gid 1000, home ``/home/app``), ``/tmp`` (1777),
``/root`` and ``/home/app``, and empty mount points (``/proc``, ``/sys``, ``/dev``). No Python, no glibc, no
dynamic loader: whatever works in it works without the image's help.

Use the session fixtures (one build per pytest worker)::

    def test_x(busybox_rootfs: Path, busybox_rootfs_tar: Path) -> None: ...

or call :func:`build_busybox_rootfs` / :func:`write_busybox_tar` with a directory of your own. Owners in the tree
are the real uids (files root, ``/home/app`` uid 1000), as they would be in an image: import the tar (which shifts
owners) rather than using the directory as a sandbox layer as-is.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")
APP_UID = 1000
APP_GID = 1000
FIXED_MTIME = 1_700_000_000  # every member's mtime in the tar

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    f"app:x:{APP_UID}:{APP_GID}:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = f"root:x:0:\napp:x:{APP_GID}:\nnogroup:x:65534:\n"


def _applets() -> list[str]:
    """Paths (relative to /) where busybox's applets live, e.g. ``bin/sh``, ``usr/bin/env``."""
    out = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True).stdout
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


def build_busybox_rootfs(dest: Path) -> Path:
    """Write the busybox-only rootfs into ``dest`` (created; must not exist or be empty). Returns ``dest``."""
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} is missing: install Debian's busybox-static (make apt does)")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    for d, mode in (
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("home/app", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
    ):
        p = dest / d
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
    (dest / "bin/busybox").write_bytes(BUSYBOX.read_bytes())
    os.chmod(dest / "bin/busybox", 0o755)
    for applet in _applets():
        link = dest / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(dest / "bin/busybox", link.parent))
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    (dest / "etc/hostname").write_text("busybox\n")
    for f in ("etc/passwd", "etc/group", "etc/hostname"):
        os.chmod(dest / f, 0o644)
    os.chown(dest / "home/app", APP_UID, APP_GID)
    return dest


def write_busybox_tar(rootfs: Path, tar_path: Path) -> Path:
    """Pack ``rootfs`` (from :func:`build_busybox_rootfs`) as an uncompressed tar with numeric owners, members
    named ``./bin/...`` like ``tar -C ROOTFS -cf rootfs.tar .``. Reproducible (sorted names, fixed mtimes): the
    same busybox gives the same bytes, so imports of it in later sessions are cache hits. Returns ``tar_path``."""
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(rootfs, arcname=".", filter=_reproducible)
    return tar_path


def _reproducible(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.uname = member.gname = ""
    member.mtime = FIXED_MTIME
    return member


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox-only rootfs directory, built once per test session (per xdist worker). Do not modify it."""
    return build_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture(scope="session")
def busybox_rootfs_tar(busybox_rootfs: Path) -> Path:
    """The busybox rootfs as ``rootfs.tar`` (uncompressed, numeric owners), built once per session."""
    return write_busybox_tar(busybox_rootfs, busybox_rootfs.parent / "rootfs.tar")
