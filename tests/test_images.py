"""Templates: spec parsing and digests (pure), ownership shift, safe tar import, and real mmdebstrap builds.

Real builds go to a cache shared between runs (BRANCHBOX_TEST_TEMPLATES, default
/var/tmp/branchbox-test/templates) so reruns are cache hits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import secrets
import shutil
import stat
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchbox.backends.base import IdMap
from branchbox.errors import TemplateBuildError, TemplateNotFoundError, TemplateSpecError
from branchbox.images import BuildEvent, TemplateSpec, TemplateStore, default_spec, load_spec
from branchbox.images.importer import resolve_in_root
from branchbox.images.shift import shift_tree
from branchbox.images.spec import FileSpec, parse_spec

TEST_ROOT = Path(os.environ.get("BRANCHBOX_TEST_ROOT", "/var/tmp/branchbox-test"))
BASE = IdMap().host_base


def shared_templates_dir() -> Path:
    return Path(os.environ.get("BRANCHBOX_TEST_TEMPLATES") or TEST_ROOT / "templates")


def _spec(tmp_path: Path, text: str) -> TemplateSpec:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return load_spec(p)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(prefix)]


def _tmp_dirs(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] if root.exists() else []


@pytest.fixture
def store_dir() -> Iterator[Path]:
    """A fresh store directory reachable by the sandbox uid range; removed afterwards."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    d = TEST_ROOT / f"images-{secrets.token_hex(4)}"
    d.mkdir(mode=0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- specs (pure) ----


BASIC = """
name = "demo"
packages = ["python3", "git"]
run = ["echo hi > /hi"]
workdir = "/work"
[env]
A = "1"
B = "2"
[files]
"/etc/motd" = "hello"
"""

REORDERED = """
[files]
"/etc/motd" = "hello"
[env]
B = "2"
A = "1"
"""


def test_default_spec_has_agent_needs() -> None:
    spec = default_spec()
    assert spec.name == "default"
    assert spec.suite == "bookworm"
    assert spec.variant == "minbase"
    for pkg in (
        "python3",
        "python3-pip",
        "python3-venv",
        "git",
        "bash",
        "coreutils",
        "curl",
        "ca-certificates",
        "procps",
    ):
        assert pkg in spec.packages
    assert spec.workdir == "/work"
    assert spec.python == "/usr/bin/python3"


def test_digest_ignores_key_order_and_package_order(tmp_path: Path) -> None:
    a = _spec(tmp_path, BASIC)
    b = _spec(
        tmp_path,
        'workdir = "/work"\nrun = ["echo hi > /hi"]\npackages = ["git", "python3"]\nname = "demo"\n' + REORDERED,
    )
    assert a.env == b.env
    assert a.files == b.files
    assert a.digest() == b.digest()
    assert len(a.digest()) == 64


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"python3", "git"', '"python3", "git", "curl"'),
        ('"/etc/motd" = "hello"', '"/etc/motd" = "hello!"'),
        ('"/etc/motd" = "hello"', '"/etc/motd" = { content = "hello", mode = 0o600 }'),
        ("echo hi > /hi", "echo ho > /hi"),
        ('A = "1"', 'A = "0"'),
        ('workdir = "/work"', 'workdir = "/srv"'),
    ],
)
def test_digest_changes_with_content(tmp_path: Path, old: str, new: str) -> None:
    assert old in BASIC
    assert _spec(tmp_path, BASIC).digest() != _spec(tmp_path, BASIC.replace(old, new)).digest()


def test_name_is_not_part_of_digest(tmp_path: Path) -> None:
    assert _spec(tmp_path, BASIC).digest() == _spec(tmp_path, BASIC.replace("demo", "other")).digest()


def test_file_source_is_relative_to_spec_and_hashed(tmp_path: Path) -> None:
    (tmp_path / "payload.txt").write_text("v1")
    text = 'name = "s"\n[files."/opt/p"]\nsource = "payload.txt"\nmode = "0755"\n'
    spec = _spec(tmp_path, text)
    f = spec.files["/opt/p"]
    assert f.source == tmp_path / "payload.txt"
    assert f.mode == 0o755
    d1 = spec.digest()
    (tmp_path / "payload.txt").write_text("v2")
    assert spec.digest() != d1


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('name = "x"\nbogus = 1\n', "bogus"),
        ('packages = ["python3"]\n', "name"),
        ('name = "Bad Name"\n', "name"),
        ('name = "x"\npackages = "python3"\n', "packages"),
        ('name = "x"\npackages = ["python3; rm -rf /"]\n', "packages"),
        ('name = "x"\npackages = ["--force-yes"]\n', "packages"),
        ('name = "x"\npip_packages = ["requests"]\npackages = ["python3"]\n', "python3-pip"),
        ('name = "x"\npip_packages = ["-e git+x"]\npackages = ["python3-pip"]\n', "pip_packages"),
        ('name = "x"\nworkdir = "work"\n', "workdir"),
        ('name = "x"\nworkdir = "/a/../b"\n', "workdir"),
        ('name = "x"\npython = 3\n', "python"),
        ('name = "x"\nvariant = "huge"\n', "variant"),
        ('name = "x"\nsuite = "Bookworm!"\n', "suite"),
        ('name = "x"\nrun = "echo"\n', "run"),
        ('name = "x"\n[env]\n"1BAD" = "x"\n', "env"),
        ('name = "x"\n[env]\nA = 1\n', "env.A"),
        ('name = "x"\n[files."/a"]\nmode = "0644"\n', "files"),
        ('name = "x"\n[files."/a"]\ncontent = "x"\nmode = "rw"\n', "mode"),
        ('name = "x"\n[files."/a"]\ncontent = "x"\nowner = "root"\n', "owner"),
        ('name = "x"\n[files."/a"]\nsource = "missing.txt"\n', "source"),
        ('name = "x"\n[files]\n"relative" = "x"\n', "files"),
        ('name = "x"\nmirror = "--evil"\n', "mirror"),
        ('name = "x"\nuser = "Not A User"\n', "user"),
        ('name = "x"\npackages = [\n', "TOML"),
    ],
)
def test_bad_spec_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(TemplateSpecError) as info:
        _spec(tmp_path, text)
    assert field in str(info.value)
    assert info.value.code == "invalid_template_spec"


def test_spec_constructor_validates() -> None:
    with pytest.raises(TemplateSpecError, match="packages"):
        TemplateSpec(name="x", packages=("UPPER",))
    spec = TemplateSpec(name="x", files={"/a": FileSpec(content="a")})
    assert parse_spec({"name": "x", "files": {"/a": "a"}}, base_dir=Path("/")) == spec


def test_resolve_in_root_never_leaves_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3.11").write_text("")
    os.symlink("python3.11", root / "usr/bin/python3")
    os.symlink("usr/bin", root / "bin")
    os.symlink("/etc/passwd", root / "abs")
    os.symlink("../../../../..", root / "up")
    assert resolve_in_root(root, "/bin/python3") == root / "usr/bin/python3.11"
    assert resolve_in_root(root, "/abs") == root / "etc/passwd"
    assert resolve_in_root(root, "/up/etc") == root / "etc"
    assert resolve_in_root(root, "/../../x") == root / "x"


# ---- ownership shift ----


@pytest.mark.root
def test_shift_tree_keeps_setuid_and_shifts_hardlinks_once(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "bin").mkdir(parents=True)
    suid = root / "bin/su"
    suid.write_text("")
    os.chmod(suid, 0o4755)
    (root / "shadow").write_text("")
    os.chown(root / "shadow", 0, 42)
    os.link(root / "shadow", root / "shadow.link")
    os.symlink("/nonexistent", root / "dangling")
    (root / "big").write_text("")
    os.chown(root / "big", 70000, 70000)
    shift_tree(root, IdMap())
    assert (os.lstat(root).st_uid, os.lstat(root).st_gid) == (BASE, BASE)
    st = os.lstat(suid)
    assert st.st_uid == BASE
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert (os.lstat(root / "shadow").st_uid, os.lstat(root / "shadow").st_gid) == (BASE, BASE + 42)
    assert os.lstat(root / "dangling").st_uid == BASE
    assert os.lstat(root / "big").st_uid == BASE + 65534


# ---- tar import ----


def _add(tar: tarfile.TarFile, name: str, *, data: bytes = b"", mode: int = 0o644, **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def _tiny_rootfs_tar(path: Path, mode: str = "w", *, python: bool = True) -> Path:
    """A minimal 'rootfs': enough for the importer's checks (not runnable)."""
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        _add(tar, ".", type=tarfile.DIRTYPE, mode=0o755)
        for d in ("usr", "usr/bin", "etc", "tmp"):
            _add(tar, d, type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "tmp", type=tarfile.DIRTYPE, mode=0o1777)
        _add(tar, "bin", type=tarfile.SYMTYPE, linkname="usr/bin")
        _add(tar, "usr/bin/dash", data=b"#!fake\n", mode=0o755)
        _add(tar, "usr/bin/sh", type=tarfile.SYMTYPE, linkname="dash")
        _add(tar, "usr/bin/su", data=b"su", mode=0o4755)
        _add(tar, "etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42)
        _add(tar, "etc/localtime", type=tarfile.SYMTYPE, linkname="/usr/share/zoneinfo/Etc/UTC")
        _add(tar, "etc/shadow-", type=tarfile.LNKTYPE, linkname="etc/shadow", mode=0o640, gid=42)
        _add(tar, "null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        if python:
            _add(tar, "usr/bin/python3.11", data=b"#!fake\n", mode=0o755)
            _add(tar, "usr/bin/python3", type=tarfile.SYMTYPE, linkname="python3.11")
    return path


@pytest.mark.root
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz"])
async def test_import_tiny_rootfs(store_dir: Path, tmp_path: Path, mode: str) -> None:
    tar = _tiny_rootfs_tar(tmp_path / "rootfs.tar", mode)
    store = TemplateStore(store_dir / "t")
    events: list[BuildEvent] = []
    info = await store.import_tar(tar, name="tiny", progress=events.append, python="/usr/bin/python3")
    assert info.name == "tiny"
    assert info.source == "import"
    assert info.python == "/usr/bin/python3"
    assert store.metadata("tiny")["python_version"] == "3.11"
    assert store.metadata("tiny")["shell"] is True
    root = store.rootfs("tiny")
    assert root == store_dir / "t" / info.digest / "rootfs"
    assert os.lstat(root).st_uid == BASE
    su = os.lstat(root / "usr/bin/su")
    assert (su.st_uid, stat.S_IMODE(su.st_mode)) == (BASE, 0o4755)
    assert os.lstat(root / "etc/shadow").st_gid == BASE + 42
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/Etc/UTC"
    assert os.lstat(root / "etc/shadow-").st_ino == os.lstat(root / "etc/shadow").st_ino
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    assert not os.path.lexists(root / "null")  # device nodes are skipped
    assert any(e.step == "extract" for e in events)
    assert _tmp_dirs(store_dir / "t") == []
    # Same tar again: a cache hit under a second name.
    again = await store.import_tar(tar, name="tiny2", python="/usr/bin/python3")
    assert again.digest == info.digest
    assert {t.name for t in store.list()} == {"tiny", "tiny2"}


@pytest.mark.root
async def test_import_zstd(store_dir: Path, tmp_path: Path) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("zstd is not installed (apt-get install zstd)")
    plain = _tiny_rootfs_tar(tmp_path / "rootfs.tar")
    proc = await asyncio.create_subprocess_exec("zstd", "-q", str(plain), "-o", str(tmp_path / "rootfs.tar.zst"))
    assert await proc.wait() == 0
    info = await TemplateStore(store_dir).import_tar(tmp_path / "rootfs.tar.zst", name="z")
    assert (store_dir / info.digest / "rootfs/usr/bin/dash").is_file()


@pytest.mark.root
async def test_concurrent_imports_extract_once(store_dir: Path, tmp_path: Path) -> None:
    tar = _tiny_rootfs_tar(tmp_path / "rootfs.tar")
    events: list[BuildEvent] = []
    stores = [TemplateStore(store_dir), TemplateStore(store_dir)]
    a, b = await asyncio.gather(*(s.import_tar(tar, name="same", progress=events.append) for s in stores))
    assert a.digest == b.digest
    assert sum(1 for e in events if e.step == "extract" and e.message.startswith("extracting")) == 1
    assert _tmp_dirs(store_dir) == []


@pytest.mark.root
async def test_import_without_python(store_dir: Path, tmp_path: Path) -> None:
    """The image needs no python (the agent brings its own); a python the caller names must be there."""
    tar = _tiny_rootfs_tar(tmp_path / "nopy.tar", python=False)
    store = TemplateStore(store_dir)
    with pytest.raises(TemplateSpecError, match=r"no executable at '/usr/bin/python3'.*leave python out"):
        await store.import_tar(tar, name="nopy", python="/usr/bin/python3")
    assert _tmp_dirs(store_dir) == []
    assert store.list() == []
    info = await store.import_tar(tar, name="nopy")
    assert info.python is None and store.metadata("nopy")["python_version"] == ""
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(TemplateSpecError, match="the rootfs is empty"):
        await store.import_tar(empty, name="empty")
    assert [t.name for t in store.list()] == ["nopy"] and _tmp_dirs(store_dir) == []


@pytest.mark.root
@pytest.mark.parametrize(
    "evil",
    ["dotdot", "absolute", "symlink_escape", "hardlink_escape", "symlink_overwrite"],
)
async def test_malicious_tar_is_rejected(store_dir: Path, tmp_path: Path, evil: str) -> None:
    outside = TEST_ROOT / f"outside-{secrets.token_hex(4)}"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("original")
    try:
        tar_path = tmp_path / "evil.tar"
        with tarfile.open(tar_path, "w") as tar:
            _add(tar, "usr", type=tarfile.DIRTYPE, mode=0o755)
            if evil == "dotdot":
                _add(tar, f"usr/../../../../../..{outside}/pwned", data=b"x")
            elif evil == "absolute":
                _add(tar, f"{outside}/pwned", data=b"x")
            elif evil == "symlink_escape":
                _add(tar, "etc", type=tarfile.SYMTYPE, linkname=str(outside))
                _add(tar, "etc/pwned", data=b"x")
            elif evil == "hardlink_escape":
                _add(tar, "victim", type=tarfile.LNKTYPE, linkname=str(victim))
            elif evil == "symlink_overwrite":
                _add(tar, "v", type=tarfile.SYMTYPE, linkname=str(victim))
                _add(tar, "v", data=b"overwritten")
        store = TemplateStore(store_dir)
        with pytest.raises(TemplateSpecError, match="refusing to import"):
            await store.import_tar(tar_path, name="evil")
        assert not (outside / "pwned").exists()
        assert victim.read_text() == "original"
        assert os.lstat(victim).st_uid == 0
        assert _tmp_dirs(store_dir) == []
        assert store.list() == []
    finally:
        shutil.rmtree(outside)


@pytest.mark.root
async def test_remove_and_not_found(store_dir: Path, tmp_path: Path) -> None:
    store = TemplateStore(store_dir)
    with pytest.raises(TemplateNotFoundError, match="build it") as info:
        store.get("nope")
    assert info.value.code == "template_not_found"
    tar = _tiny_rootfs_tar(tmp_path / "rootfs.tar")
    a = await store.import_tar(tar, name="a")
    await store.import_tar(tar, name="b")
    assert store.get(a.digest).digest == a.digest
    assert store.get(a.digest[:12]).digest == a.digest
    store.remove("a")
    with pytest.raises(TemplateNotFoundError):
        store.get("a")
    assert store.get("b").digest == a.digest
    store.remove("b")
    assert not (store_dir / a.digest).exists()
    assert store.list() == []


# ---- real builds (mmdebstrap) ----

SMALL = """
name = "bbtest-small"
packages = ["python3"]
workdir = "/work"
run = [
    "echo built-by-run-step > /opt/run.txt",
    "test -r /proc/self/status && test -c /dev/null && echo proc-and-dev-ok > /opt/mounts.txt",
    "sleep 600 &",
]
[env]
BBTEST = "yes"
[files."/etc/bbtest.conf"]
content = "hello from the spec\\n"
mode = 0o640
"""


@pytest.fixture(scope="module")
def small_build() -> tuple[TemplateStore, TemplateSpec, list[BuildEvent]]:
    """The small test template, built once and cached across runs in the shared template dir."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(TEST_ROOT, 0o711)
    store = TemplateStore(shared_templates_dir())
    spec = parse_spec(tomllib.loads(SMALL), base_dir=Path("/"))
    events: list[BuildEvent] = []
    asyncio.run(store.build(spec, progress=events.append))
    return store, spec, events


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.template
def test_real_build(small_build: tuple[TemplateStore, TemplateSpec, list[BuildEvent]]) -> None:
    store, spec, _ = small_build
    info = store.get("bbtest-small")
    assert info.digest == spec.digest()
    assert info.env == {"BBTEST": "yes"}
    assert info.workdir == "/work"
    assert info.python == "/usr/bin/python3"
    assert info.size_bytes > 50_000_000
    meta = store.metadata("bbtest-small")
    assert meta["python_version"].startswith("3.")
    root = store.rootfs("bbtest-small")
    assert (root / "opt/run.txt").read_text() == "built-by-run-step\n"
    assert (root / "opt/mounts.txt").read_text() == "proc-and-dev-ok\n"
    conf = root / "etc/bbtest.conf"
    assert conf.read_text() == "hello from the spec\n"
    assert stat.S_IMODE(os.lstat(conf).st_mode) == 0o640
    for p in (root, root / "etc/passwd", conf, root / "work", root / "usr/bin/python3"):
        assert os.lstat(p).st_uid == BASE, p
        assert os.lstat(p).st_gid == BASE, p
    su = os.lstat(root / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) & stat.S_ISUID
    assert not list((root / "var/lib/apt/lists").glob("*_Packages"))
    assert not (root / ".branchbox-build").exists()
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert _mounts_under(store.root) == []
    assert _tmp_dirs(store.root) == []


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.template
async def test_second_build_is_cache_hit(
    small_build: tuple[TemplateStore, TemplateSpec, list[BuildEvent]],
) -> None:
    store, spec, _ = small_build
    events: list[BuildEvent] = []
    info = await store.build(spec, progress=events.append)
    assert [e.step for e in events] == ["cached"]
    renamed = dataclasses.replace(spec, name="bbtest-small-alias")
    alias = await TemplateStore(store.root).build(renamed, progress=events.append)
    assert alias.digest == info.digest
    assert "mmdebstrap" not in {e.step for e in events}
    assert store.get("bbtest-small-alias").name == "bbtest-small-alias"


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.template
async def test_import_of_built_rootfs(
    small_build: tuple[TemplateStore, TemplateSpec, list[BuildEvent]], store_dir: Path
) -> None:
    store, _, _ = small_build
    src = store.rootfs("bbtest-small")

    def unshift(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid -= BASE
        ti.gid -= BASE
        ti.uname = ti.gname = ""
        return ti

    tar_path = store_dir / "built.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src, arcname=".", filter=unshift)
    imported = TemplateStore(store_dir / "store")
    info = await imported.import_tar(tar_path, name="reimported", env={"X": "1"}, workdir="/work")
    root = imported.rootfs("reimported")
    assert info.env == {"X": "1"}
    assert (root / "opt/run.txt").read_text() == "built-by-run-step\n"
    assert os.lstat(root / "etc/passwd").st_uid == BASE
    assert os.lstat(root / "etc/shadow").st_gid == os.lstat(src / "etc/shadow").st_gid
    assert stat.S_IMODE(os.lstat(root / "usr/bin/su").st_mode) == stat.S_IMODE(os.lstat(src / "usr/bin/su").st_mode)
    assert imported.metadata("reimported")["python_version"].startswith("3.")


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.template
async def test_failing_run_step_reports_step_and_output(store_dir: Path) -> None:
    spec = TemplateSpec(
        name="bbtest-fail",
        packages=("python3",),
        run=("echo ok-step", "echo marker-before-failure; echo oops >&2; exit 7"),
    )
    store = TemplateStore(store_dir / "t")
    events: list[BuildEvent] = []
    with pytest.raises(TemplateBuildError) as info:
        await store.build(spec, progress=events.append)
    msg = str(info.value)
    assert "run[2]" in msg
    assert "exit code 7" in msg
    assert "marker-before-failure" in msg
    assert "oops" in msg
    assert any(e.step == "run[1]" and e.message == "ok-step" for e in events)
    assert _tmp_dirs(store_dir / "t") == []
    assert _mounts_under(store_dir) == []
    with pytest.raises(TemplateNotFoundError):
        store.get("bbtest-fail")


def _procs_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if text.encode() in fh.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.template
async def test_cancelled_build_leaves_nothing(store_dir: Path) -> None:
    spec = TemplateSpec(name="bbtest-cancel", packages=("python3",), run=("echo never",))
    store = TemplateStore(store_dir / "t")
    downloading = asyncio.Event()

    def on_event(e: BuildEvent) -> None:
        if e.step == "mmdebstrap" and e.fraction is not None and e.fraction >= 0.2:
            downloading.set()

    task = asyncio.create_task(store.build(spec, progress=on_event))
    waiter = asyncio.create_task(downloading.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    assert waiter in done, "the build ended before mmdebstrap started downloading"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _tmp_dirs(store_dir / "t") == []
    assert _mounts_under(store_dir) == []
    assert _procs_mentioning(str(store_dir)) == []


NOPY = """
name = "bbtest-nopython"
packages = []
"""


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.template
def test_spec_build_without_python() -> None:
    """A spec whose image has no python3 builds (the agent brings its own): minbase without python3. The default
    python path may be missing; a python the spec names must exist. Built once, cached across runs."""
    store = TemplateStore(shared_templates_dir())
    spec = parse_spec(tomllib.loads(NOPY), base_dir=Path("/"))
    info = asyncio.run(store.build(spec))
    assert info.python is None
    meta = store.metadata("bbtest-nopython")
    assert meta["python_version"] == "" and meta["python"] is None
    root = store.rootfs("bbtest-nopython")
    assert not os.path.lexists(root / "usr/bin/python3") and (root / "bin/sh").exists()
