"""Issue 25, "any image runs": templates without Python (busybox-only, shell-less) in containers and microVMs,
through the SDK against a real daemon. The images come from tests/rootfs_fixtures.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import branchbox.sdk as sdk
from branchbox.images.store import TemplateStore
from branchbox.sdk import BadRequestError, Sandbox
from branchbox.workspaces.testing import GitDaemon
from tests.conftest import DaemonProc, cli_env, templates_dir, vm_cache
from tests.rootfs_fixtures import APP_UID, BUSYBOX, GROUP, PASSWD, build_busybox_rootfs, write_busybox_tar
from tests.test_pools_api import wait_pool
from tests.test_workspaces import git_base, git_daemon  # noqa: F401 - session fixtures of that module


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


# ------------------------------------------------------------------ templates made of the busybox rootfs

BUSYBOX_TEMPLATE = "any-busybox"  # names in the shared template store (content-addressed: same tar, same digest)
SHELLLESS_TEMPLATE = "any-shellless"


def import_template(tar: Path, name: str) -> str:
    """``branchbox template import TAR --name NAME`` as a user runs it; returns the digest it prints."""
    out = subprocess.run(
        [sys.executable, "-m", "branchbox.cli", "template", "import", str(tar), "--name", name,
         "--templates-dir", str(templates_dir())],
        env=cli_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


@pytest.fixture(scope="session")
def busybox_template(busybox_rootfs_tar: Path) -> str:
    """The busybox rootfs imported as template ``any-busybox`` (no python, no libc)."""
    import_template(busybox_rootfs_tar, BUSYBOX_TEMPLATE)
    return BUSYBOX_TEMPLATE


@pytest.fixture(scope="session")
def shellless_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A distroless-like image: one static program (/app/busybox), /etc/passwd, no /bin/sh."""
    root = tmp_path_factory.mktemp("shellless") / "rootfs"
    (root / "app").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(BUSYBOX, root / "app/busybox")
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    import_template(write_busybox_tar(root, root.parent / "rootfs.tar"), SHELLLESS_TEMPLATE)
    return SHELLLESS_TEMPLATE


@pytest.mark.root
def test_busybox_template_runs_in_containers(daemon: DaemonProc, busybox_template: str, tmp_path: Path) -> None:
    """Commands (shell strings, argv, background, stdin), files (read/write/list, upload/download, archives),
    users from the image's /etc/passwd, a PTY, snapshot and fork: all on an image without Python."""
    meta = TemplateStore(templates_dir()).metadata(busybox_template)
    assert meta["python"] is None and meta["shell"] is True
    with Sandbox.create(template=busybox_template, base_url=daemon.url, request_timeout=120) as sbx:
        assert not sbx.files.exists("/usr/bin/python3")
        r = sbx.commands.run("echo $((6*7)) | cat; ls /usr/lib 2>&1 | wc -l")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.split() == ["42", "1"]  # "ls: /usr/lib: No such file or directory": no libc, no python
        assert sbx.commands.run(["/bin/busybox", "id", "-u"]).stdout == "0\n"
        assert sbx.commands.run("cat", stdin="from stdin\n").stdout == "from stdin\n"
        bg = sbx.commands.run("sleep 1; echo done", background=True)
        assert bg.wait().stdout == "done\n"
        # users: the agent reads the image's /etc/passwd itself
        who = sbx.commands.run("id -un; echo $HOME; touch /home/app/mine; stat -c %U /home/app/mine", user="app")
        assert who.stdout.split() == ["app", "/home/app", "app"], who.stderr
        # files: the agent's own tar and file code, not the image's tools
        sbx.files.write("/tmp/hello.txt", "hello busybox\n")
        assert sbx.files.read("/tmp/hello.txt") == "hello busybox\n"
        assert "hello.txt" in [e.name for e in sbx.files.list("/tmp")]
        src = tmp_path / "up"
        (src / "sub").mkdir(parents=True)
        (src / "sub/a.txt").write_text("a\n")
        sbx.files.upload_dir(src, "/data")
        assert sbx.commands.run("cat /data/sub/a.txt").stdout == "a\n"
        sbx.files.download_dir("/data", tmp_path / "down")
        assert (tmp_path / "down/sub/a.txt").read_text() == "a\n"
        # a PTY: the default login shell is the image's /bin/sh (busybox has no bash)
        out: list[bytes] = []
        term = sbx.pty.create(on_data=out.append)
        term.send_input("echo pty-$((40+2)) $0\nexit 3\n")
        assert term.wait(timeout=60).exit_code == 3
        assert "pty-42 /bin/sh" in b"".join(out).decode()
        # snapshot and fork keep the image's files and what the sandbox wrote
        sbx.files.write("/root/state", "before\n")
        snap = sbx.create_snapshot()
        (child,) = sbx.fork()
        assert isinstance(child, Sandbox), child
        with child:
            assert child.commands.run("cat /root/state; echo $((1+1))").stdout == "before\n2\n"
    with Sandbox.create(snapshot=snap.snapshot_id, base_url=daemon.url, request_timeout=120) as restored:
        assert restored.files.read("/root/state") == "before\n"


@pytest.mark.root
def test_busybox_template_warm_pool(daemon_factory: Any, busybox_template: str) -> None:
    """A warm pool of the busybox template fills, and a create is served from it."""
    d = daemon_factory(config=f"[pools.{busybox_template}]\nmin_size = 1\ntarget_free = 1\nmax_size = 2\n")
    wait_pool(d, busybox_template, 1)
    with Sandbox.create(template=busybox_template, base_url=d.url, request_timeout=120) as sbx:
        assert sbx.info.source == "warm"
        assert sbx.commands.run("echo warm-$((1+1))").stdout == "warm-2\n"


@pytest.mark.root
def test_shellless_image_runs_argv_and_says_what_to_change(daemon: DaemonProc, shellless_template: str) -> None:
    """Without /bin/sh an argv list runs; a command string that needs a shell is a clear 400 (bad_request, with
    reason no_shell) naming the fix; a simple string whose program is missing answers 127 like a shell."""
    meta = TemplateStore(templates_dir()).metadata(shellless_template)
    assert meta["shell"] is False
    with Sandbox.create(template=shellless_template, base_url=daemon.url, request_timeout=120) as sbx:
        r = sbx.commands.run(["/app/busybox", "echo", "no", "shell"])
        assert (r.exit_code, r.stdout) == (0, "no shell\n")
        assert sbx.commands.run("/app/busybox basename /a/b").stdout == "b\n"  # simple: runs without a shell
        with pytest.raises(BadRequestError, match=r"has no shell \(/bin/sh\).*list of arguments") as info:
            sbx.commands.run("/app/busybox echo $HOME | /app/busybox cat")
        assert info.value.details.get("reason") == "no_shell"
        with pytest.raises(BadRequestError, match="has no shell"):
            sbx.commands.run("echo $HOME", background=True)
        missing = sbx.commands.run("nothere --flag")
        assert missing.exit_code == 127 and "nothere: command not found" in missing.stderr
        sbx.files.write("/data/x", "files work\n")
        assert sbx.files.read("/data/x") == "files work\n"
        assert sbx.commands.run(["/app/busybox", "id", "-un"], user="app").stdout == "app\n"


@pytest.mark.root
@pytest.mark.microvm
def test_busybox_template_boots_as_a_microvm(daemon_factory: Any, busybox_template: str, tmp_path: Path) -> None:
    """The guest's agent runs on branchbox's runtime disk (the host's python3 and libraries through the host's
    loader), not on the image's (busybox has none): commands, files, archives, users, a PTY and a fork."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed (make apt installs qemu-system-x86)")
    d = daemon_factory(env={"BRANCHBOX_VM_CACHE": str(vm_cache())})
    with Sandbox.create(template=busybox_template, backend="microvm", base_url=d.url, request_timeout=300) as sbx:
        assert sbx.info.backend == "microvm"
        pid1 = sbx.commands.run(["/bin/busybox", "cat", "/proc/1/cmdline"]).stdout.split("\0")
        assert pid1[:4] == ["/.branchbox/rt/lib/ld-linux-x86-64.so.2", "--library-path", "/.branchbox/rt/lib",
                            "/.branchbox/rt/bin/python3"], pid1  # fmt: skip
        r = sbx.commands.run("echo $((6*7)) | cat; ls /usr/lib /lib 2>&1 | wc -l; touch /.branchbox/rt/x 2>&1")
        assert r.stdout.split()[:2] == ["42", "2"], r.stdout  # no /usr/lib, no /lib: no libc, no python
        assert "Read-only file system" in r.stdout
        assert sbx.commands.run("id -un", user="app").stdout == "app\n"
        sbx.files.write("/home/app/note", "in a VM\n")
        assert sbx.files.read("/home/app/note") == "in a VM\n"
        src = tmp_path / "up"
        src.mkdir()
        (src / "f.txt").write_text("archived\n")
        sbx.files.upload_dir(src, "/data")
        assert sbx.commands.run("cat /data/f.txt").stdout == "archived\n"
        out: list[bytes] = []
        term = sbx.pty.create(cmd=["/bin/sh"], on_data=out.append)
        term.send_input("echo vm-pty-$((2+3))\nexit\n")
        term.wait(timeout=120)
        assert "vm-pty-5" in b"".join(out).decode()
        (kid,) = sbx.fork(count=1)
        assert isinstance(kid, Sandbox), kid
        with kid:
            assert kid.files.read("/home/app/note") == "in a VM\n"
            assert kid.commands.run(["/bin/busybox", "echo", "forked"]).stdout == "forked\n"


@pytest.mark.root
def test_runtime_runs_the_agent_in_a_root_without_python(tmp_path: Path) -> None:
    """The microVM runtime's files, put at /.branchbox/rt of a busybox root (no libc, no python), run the agent's
    modules in a chroot exactly as the guest's shim starts them; stdlib comes from the runtime, not the image."""
    from branchbox import agent
    from branchbox.backends.microvm import runtime

    root = build_busybox_rootfs(tmp_path / "root")
    runtime.write_tree(runtime.interpreter(), runtime.stdlib_dir(), root / ".branchbox/rt")
    (root / ".branchbox/bbagent").mkdir()
    for name in agent.FILES:
        shutil.copy2(Path(agent.__file__).with_name(name), root / ".branchbox/bbagent" / name)
    argv = runtime.agent_argv("server")
    probe = ("import sys;sys.path[:0]=['/.branchbox'];import bbagent.server, bbagent.vsock, bbagent.archive, "
             "tarfile, pty, termios, gzip, json, asyncio;"
             "print(sys.prefix, all(m.__file__.startswith('/.branchbox/') for m in sys.modules.values() "
             "if getattr(m, '__file__', None)))")  # fmt: skip
    out = subprocess.run(["chroot", str(root), *argv[:-1], probe], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["/.branchbox/rt", "True"]
    assert argv[-1].endswith("from bbagent.server import main;main()")
    shim = (Path(runtime.__file__).parent / "guest/shim.sh").read_text()
    assert "$rt/lib/ld-linux-x86-64.so.2 --library-path $rt/lib $rt/bin/python3 -I -S -B" in shim


@pytest.mark.root
def test_workspace_on_the_busybox_template(
    daemon: DaemonProc,
    busybox_template: str,
    git_daemon: GitDaemon,  # noqa: F811
) -> None:
    """A workspace checks a repository out into a busybox sandbox: the host's git makes the commit layer, so the
    image needs no git (its files are there; running git inside is the image's business)."""
    with sdk.Workspace.create(
        git_daemon.url("repo.git"), branch="main", template=busybox_template, base_url=daemon.url
    ) as w:
        assert w.sandbox.files.exists("/bin/busybox") and not w.sandbox.files.exists("/usr/bin/python3")
        names = [e.name for e in w.sandbox.files.list(w.path)]
        assert ".git" in names and len(names) > 1
        head = w.sandbox.commands.run(f"cat {w.path}/.git/HEAD; ls {w.path} | wc -l")
        assert head.exit_code == 0, head.stderr
        assert head.stdout.startswith("ref: refs/heads/") or head.stdout.startswith(w.commit)
        assert w.sandbox.commands.run("git --version").exit_code == 127  # busybox has no git
