"""Templates from OCI/Docker images (issue 25): `template import-image` with skopeo's transports, OCI layer
semantics (whiteouts, opaque dirs, hard links, owners, setuid, devices), the shared layer cache, typed errors
that leave nothing behind, and the attacks a hostile image can try. The images are made by the tests
(tests/oci_images.py); no network."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from branchbox.errors import (
    BranchboxError,
    ImageDigestMismatchError,
    ImageNotFoundError,
    ImageReferenceError,
    ImageTooLargeError,
    RegistryAuthError,
    RegistryUnreachableError,
    UnsafeImageError,
    UnsupportedImageError,
)
from branchbox.images.oci_fetch import FetchOptions, parse_ref
from branchbox.images.oci_layout import Layer, read_image
from branchbox.images.oci_unpack import Budget, apply_layer
from branchbox.images.store import TemplateStore
from branchbox.sdk import BadRequestError as SdkBadRequest
from branchbox.sdk import PermissionDeniedError, Sandbox, Template
from tests.conftest import DaemonProc, cli_env, templates_dir
from tests.oci_images import (
    LAYER_MEDIA,
    Entry,
    digest_of,
    dir_tar,
    dockerd,
    registry,
    skopeo_copy,
    tar_bytes,
    write_layout,
)
from tests.rootfs_fixtures import APP_UID

CAP_NET_RAW = "\x01\x00\x00\x02" + "\x00\x20\x00\x00" + "\x00" * 12  # vfs_cap_data v2: cap_net_raw permitted
BASE = [
    Entry("bin", "dir", mode=0o755),
    Entry("bin/sh", data=b"#!/bin/true\n", mode=0o755),
    Entry("etc", "dir", mode=0o755),
    Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
    Entry("etc/gone", data=b"deleted by a whiteout"),
    Entry("opt/lower", "dir", mode=0o755),
    Entry("opt/lower/old", data=b"hidden by an opaque dir"),
    Entry("home/app/owned", data=b"mine", uid=1000, gid=1000),
    Entry("usr/bin/su", data=b"setuid", mode=0o4755),
    Entry("usr/bin/ping", data=b"caps", mode=0o755, pax={"SCHILY.xattr.security.capability": CAP_NET_RAW}),
    Entry("dev/null", "chardev"),
    Entry("lib", "symlink", link="usr/lib"),
    Entry("usr/lib/libc.so", data=b"libc"),
    Entry("data", "dir", mode=0o755),
    Entry("data/swap", "dir", mode=0o755),
    Entry("data/swap/in-dir", data=b"x"),
]
TOP = [
    Entry("etc/.wh.gone"),
    Entry("opt/lower/.wh..wh..opq"),
    Entry("opt/lower/new", data=b"this layer's"),
    Entry("etc/hosts", data=b"127.0.0.1 localhost\n"),
    Entry("etc/hosts.hard", "hardlink", link="etc/hosts"),
    Entry("lib/libextra.so", data=b"through the /lib symlink"),
    Entry("data/swap", data=b"a file replaces the directory"),
]
CONFIG = {
    "Env": ["PATH=/usr/bin:/bin", "GREETING=hello world", "EMPTY="],
    "WorkingDir": "/srv/app",
    "User": "1000",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo hi"],
}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates")


def assert_nothing_left(store: TemplateStore, keep: Collection[str] = ()) -> None:
    """No temp dir, and no template or name besides ``keep``'s."""
    root = store.root
    if not root.exists():
        return
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert {t.name for t in store.list()} == set(keep)


def image(tmp_path: Path, layers: list[list[Entry]], name: str = "img", **kw: Any) -> Path:
    layout = tmp_path / name
    write_layout(layout, [tar_bytes(entries) for entries in layers], **kw)
    return layout


# ------------------------------------------------------------------ references


@pytest.mark.parametrize(
    "ref",
    [
        "docker://registry.example.com:5000/team/app:1.2",
        "docker://alpine",
        "docker://library/python:3.12-slim",
        "docker://localhost/x@sha256:" + "a" * 64,
        "docker-daemon:busybox:latest",
        "docker-daemon:sha256:" + "b" * 64,
    ],
)
def test_good_references(ref: str) -> None:
    parsed = parse_ref(ref)
    assert str(parsed) == ref


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "alpine:3",  # no transport
        "docker:alpine",  # docker needs //
        "docker://Alpine",  # upper case repository
        "docker://x/../y",
        "docker://-x",
        "docker://a b",
        "docker-daemon:busybox",  # no tag
        "dir:/tmp/x",  # a transport we do not offer
        "containers-storage:x",
        "docker://x\n",
        "oci:/tmp/x:bad name",
    ],
)
def test_bad_references(ref: str) -> None:
    with pytest.raises(ImageReferenceError) as exc:
        parse_ref(ref)
    assert exc.value.code == "invalid_image_reference"
    assert "skopeo's syntax" in exc.value.message


def test_registry_of_a_reference() -> None:
    assert parse_ref("docker://alpine").registry == "docker.io"
    assert parse_ref("docker://library/alpine").registry == "docker.io"
    assert parse_ref("docker://127.0.0.1:5000/a/b:1").registry == "127.0.0.1:5000"
    assert parse_ref("docker://localhost/a").registry == "localhost"


# ------------------------------------------------------------------ layers


@pytest.mark.parametrize("compression", ["gzip", "zstd", ""])
def test_layers_unpack_with_oci_semantics(tmp_path: Path, store: TemplateStore, compression: str) -> None:
    layout = image(tmp_path, [BASE, TOP], compression=compression, config=CONFIG)
    events: list[str] = []
    info = run(store.import_image(f"oci:{layout}:latest", name="sem", progress=lambda e: events.append(e.step)))
    assert info.name == "sem"
    assert info.source == "image"
    r = store.rootfs("sem")
    base = store.idmap.host_base

    def owner(p: str) -> tuple[int, int]:
        st = os.lstat(r / p)
        return st.st_uid - base, st.st_gid - base

    assert not (r / "etc/gone").exists()  # whiteout
    assert sorted(os.listdir(r / "opt/lower")) == ["new"]  # opaque: the lower's 'old' is gone, this layer's stays
    assert (r / "etc/passwd").exists()
    hosts, hard = os.lstat(r / "etc/hosts"), os.lstat(r / "etc/hosts.hard")
    assert (hosts.st_ino, hosts.st_nlink) == (hard.st_ino, 2)  # a hard link, inside the root
    assert owner("home/app/owned") == (1000, 1000)
    assert owner("home/app") == (0, 0)  # implicit parents belong to root inside
    assert owner("etc/passwd") == (0, 0)
    su = os.lstat(r / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755  # setuid survives the shift
    assert os.getxattr(r / "usr/bin/ping", "security.capability", follow_symlinks=False)[:4] == b"\x01\x00\x00\x02"
    assert not (r / "dev/null").exists()  # device nodes are skipped
    assert (r / "usr/lib/libextra.so").read_bytes() == b"through the /lib symlink"  # parent symlink followed inside
    assert os.readlink(r / "lib") == "usr/lib"
    assert (r / "data/swap").read_bytes() == b"a file replaces the directory"
    assert (r / "srv/app").is_dir()  # the image's WorkingDir is made
    assert owner("srv") == (0, 0)
    meta = store.metadata("sem")
    assert meta["env"] == {"PATH": "/usr/bin:/bin", "GREETING": "hello world", "EMPTY": ""}
    assert meta["workdir"] == "/srv/app"
    assert meta["user"] == "1000"
    assert meta["entrypoint"] == ["/bin/sh", "-c"]
    assert meta["cmd"] == ["echo hi"]
    assert meta["image"]["platform"] == "linux/amd64"
    assert meta["image"]["skipped_devices"] == 1
    assert {"fetch", "verify", "unpack", "done"} <= set(events)


def test_layer_cache_is_shared_and_reimport_is_cached(tmp_path: Path, store: TemplateStore) -> None:
    a = image(tmp_path, [BASE, TOP], name="a", config=CONFIG)
    b = image(tmp_path, [BASE, TOP, [Entry("extra", data=b"b only")]], name="b", config=CONFIG)
    info_a = run(store.import_image(f"oci:{a}:latest", name="a"))
    assert store.metadata("a")["image"]["layers_unpacked"] == 2
    info_b = run(store.import_image(f"oci:{b}:latest", name="b"))
    meta_b = store.metadata("b")["image"]
    assert (meta_b["layers_cached"], meta_b["layers_unpacked"]) == (2, 1)
    assert info_a.digest != info_b.digest
    assert (store.rootfs("b") / "extra").exists()
    assert not (store.rootfs("a") / "extra").exists()  # stacks are cloned, never shared writable
    steps: list[str] = []
    again = run(store.import_image(f"oci:{a}:latest", name="a-again", progress=lambda e: steps.append(e.step)))
    assert again.digest == info_a.digest
    assert "cached" in steps
    assert "unpack" not in steps
    assert len(list((store.root / "layers").iterdir())) == 3


def test_other_transports_give_the_same_tree(tmp_path: Path, store: TemplateStore) -> None:
    layout = image(tmp_path, [BASE, TOP], config=CONFIG)
    skopeo_copy(f"oci:{layout}:latest", f"oci-archive:{tmp_path}/img.oci.tar:latest")
    skopeo_copy(f"oci:{layout}:latest", f"docker-archive:{tmp_path}/img.docker.tar:test/img:1")
    trees = {}
    for ref in (f"oci:{layout}", f"oci-archive:{tmp_path}/img.oci.tar", f"docker-archive:{tmp_path}/img.docker.tar"):
        info = run(store.import_image(ref, name=ref.split(":")[0]))
        r = store.rootfs(info.name)
        trees[ref.split(":")[0]] = sorted(str(p.relative_to(r)) for p in r.rglob("*"))
        assert store.metadata(info.name)["env"]["GREETING"] == "hello world"
    assert trees["oci"] == trees["oci-archive"] == trees["docker-archive"]


def test_index_picks_this_platform(tmp_path: Path, store: TemplateStore) -> None:
    layout = image(tmp_path, [BASE], as_index=True)
    picked = read_image(layout, layout / "blobs", ref_name="latest")  # our own index walk (arm64 decoy first)
    assert picked.architecture == "amd64"
    info = run(store.import_image(f"oci:{layout}:latest", name="multi"))
    assert (store.rootfs(info.name) / "bin/sh").exists()
    arm = image(tmp_path, [BASE], name="arm", architecture="arm64")
    with pytest.raises(UnsupportedImageError, match="linux/arm64"):
        run(store.import_image(f"oci:{arm}:latest", name="arm"))
    assert store.list()[0].name == "multi"


# ------------------------------------------------------------------ errors leave nothing behind


def test_errors_are_typed_and_leave_nothing(tmp_path: Path, store: TemplateStore) -> None:
    layout = image(tmp_path, [BASE])
    cases: list[tuple[str, type[BranchboxError]]] = [
        (f"oci:{layout}:nope", ImageNotFoundError),
        (f"docker-archive:{tmp_path}/missing.tar", ImageNotFoundError),
        (f"oci:{tmp_path}/missing-dir", ImageNotFoundError),
        ("docker://127.0.0.1:1/none/such:1", RegistryUnreachableError),
        ("nonsense", ImageReferenceError),
    ]
    for ref, cls in cases:
        with pytest.raises(cls) as exc:
            run(store.import_image(ref, name="x"))
        assert exc.value.code == cls.code, (ref, exc.value)
        assert_nothing_left(store)
    odd = image(tmp_path, [BASE], name="odd", layer_media="application/vnd.example.layer.v1+tar")
    with pytest.raises(UnsupportedImageError, match="media type"):
        run(store.import_image(f"oci:{odd}:latest", name="x"))
    assert_nothing_left(store)
    # a layer that is not what its media type says (skopeo recompresses such blobs, so straight to the unpacker)
    plain = tmp_path / "plain.tar"
    plain.write_bytes(tar_bytes(BASE))
    for compression in ("gzip", "zstd"):
        fake = Layer("sha256:" + "0" * 64, 0, LAYER_MEDIA[compression], compression, digest_of(plain.read_bytes()))
        (tmp_path / "root").mkdir(exist_ok=True)
        with pytest.raises(UnsupportedImageError, match=compression):
            apply_layer(tmp_path / "root", plain, fake, store.idmap, Budget())


def test_digest_mismatch(tmp_path: Path, store: TemplateStore) -> None:
    layout = image(tmp_path, [BASE, TOP], compression="")
    blob = layout / "blobs/sha256" / read_image(layout, layout / "blobs").layers[1].digest[7:]
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF  # inside the first member's content
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageDigestMismatchError):
        run(store.import_image(f"oci:{layout}:latest", name="x"))
    assert_nothing_left(store)
    # a config whose diff_id lies about an intact layer: caught while unpacking, and the stack is not kept
    lying = tmp_path / "lying"
    write_layout(lying, [tar_bytes([*BASE, Entry("extra")])], diff_ids=[digest_of(tar_bytes(BASE))])
    with pytest.raises(ImageDigestMismatchError, match="unpacks to"):
        run(store.import_image(f"oci:{lying}:latest", name="x"))
    assert_nothing_left(store)
    assert not list((store.root / "layers").iterdir())


def test_a_shared_blob_gone_bad_is_fetched_again(tmp_path: Path, store: TemplateStore) -> None:
    layout = image(tmp_path, [BASE, TOP])
    run(store.import_image(f"oci:{layout}:latest", name="a"))
    store.remove("a")
    shutil.rmtree(store.root / "layers")  # no cached stacks: the blobs are read again
    blob = store.root / "blobs/sha256" / read_image(layout, layout / "blobs").layers[0].digest[7:]
    blob.write_bytes(b"rotten" + blob.read_bytes()[6:])
    with pytest.raises(ImageDigestMismatchError):
        run(store.import_image(f"oci:{layout}:latest", name="a"))  # skopeo reuses the blob it has; we check it
    assert not blob.exists()
    assert_nothing_left(store)
    run(store.import_image(f"oci:{layout}:latest", name="a"))  # downloaded afresh
    assert (store.rootfs("a") / "etc/hosts").exists()


# ------------------------------------------------------------------ attacks


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([Entry("../escape", data=b"x")], "contains '..'"),
        ([Entry("/etc/escape", data=b"x")], "absolute path"),
        ([Entry("a/../../escape", data=b"x")], "contains '..'"),
        ([Entry("etc/../.wh.x")], "contains '..'"),
        ([Entry("x", "hardlink", link="/etc/passwd")], "absolute path"),
        ([Entry("x", "hardlink", link="../../../etc/passwd")], "contains '..'"),
        ([Entry("x", "hardlink", link="missing")], "no such file"),
        ([Entry("d", "dir"), Entry("x", "hardlink", link="d")], "directory"),
        ([Entry("etc/.wh..")], "names no file"),
    ],
)
def test_hostile_entries_are_refused(tmp_path: Path, store: TemplateStore, entries: list[Entry], match: str) -> None:
    layout = image(tmp_path, [BASE, entries])
    with pytest.raises(UnsafeImageError, match=match) as exc:
        run(store.import_image(f"oci:{layout}:latest", name="evil"))
    assert exc.value.code == "unsafe_image"
    assert_nothing_left(store)


def test_symlinks_never_reach_the_host(tmp_path: Path, store: TemplateStore) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "victim").write_text("keep me")
    (host / "passwd").write_text("host secret")
    evil = [
        Entry("abs", "symlink", link=str(host)),
        Entry("rel", "symlink", link="../../../../../../../../.." + str(host)),
    ]
    writes = [
        Entry("abs/planted", data=b"written through an absolute symlink"),
        Entry("rel/planted2", data=b"written through a relative symlink"),
        Entry("abs/.wh.victim"),
        Entry("stolen", "hardlink", link="abs/passwd"),
    ]
    layout = image(tmp_path, [BASE, evil, writes[:3]])
    info = run(store.import_image(f"oci:{layout}:latest", name="sym"))
    r = store.rootfs(info.name)
    assert sorted(os.listdir(host)) == ["passwd", "victim"]
    assert (host / "victim").read_text() == "keep me"
    assert (r / str(host).lstrip("/") / "planted").read_bytes() == b"written through an absolute symlink"
    assert (r / str(host).lstrip("/") / "planted2").exists()
    layout2 = image(tmp_path, [BASE, evil, writes[3:]], name="img2")
    with pytest.raises(UnsafeImageError, match="no such file"):  # the link resolves inside the root: not there
        run(store.import_image(f"oci:{layout2}:latest", name="sym2"))
    assert os.stat(host / "passwd").st_nlink == 1


def test_a_hard_link_to_a_symlink_never_changes_what_it_points_at(tmp_path: Path, store: TemplateStore) -> None:
    """A hard link naming a symlink of the image (`stolen` -> `evil` -> /HOST/victim) is a second name of that
    symlink: its owner, mode and mtime are set without following it (tarfile's extract chowned, chmodded and
    stamped the host file through it)."""
    host = tmp_path / "host"
    host.mkdir()
    victim = host / "victim"
    victim.write_text("host secret")
    os.chmod(victim, 0o600)
    os.utime(victim, (1_000_000, 1_000_000))
    before = os.stat(victim)
    layers = [
        BASE,
        [Entry("evil", "symlink", link=str(victim)), Entry("evil-dir", "symlink", link=str(host))],
        [Entry("stolen", "hardlink", link="evil", uid=1000, gid=1000, mode=0o4777)],
    ]
    layout = image(tmp_path, layers)
    info = run(store.import_image(f"oci:{layout}:latest", name="hl"))
    r = store.rootfs(info.name)
    after = os.stat(victim)
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode), after.st_mtime, after.st_nlink) == (
        before.st_uid,
        before.st_gid,
        0o600,
        1_000_000,
        1,
    )
    assert os.readlink(r / "stolen") == str(victim)  # the symlink's second name, resolved inside the sandbox
    assert os.lstat(r / "stolen").st_ino == os.lstat(r / "evil").st_ino
    assert os.lstat(r / "stolen").st_uid == store.idmap.host_base + 1000
    # entries of a later layer over those symlinks replace the symlinks, never write through them
    over = [
        Entry("evil", data=b"a file replaces the symlink", mode=0o4755),
        Entry("evil-dir", "dir", mode=0o777),
        Entry("evil-dir/planted", data=b"inside"),
    ]
    layout2 = image(tmp_path, [*layers, over], name="img2")
    info2 = run(store.import_image(f"oci:{layout2}:latest", name="hl2"))
    r2 = store.rootfs(info2.name)
    assert (r2 / "evil").read_bytes() == b"a file replaces the symlink"
    assert stat.S_IMODE(os.lstat(r2 / "evil").st_mode) == 0o4755
    assert (r2 / "evil-dir").is_dir() and not (r2 / "evil-dir").is_symlink()
    assert victim.read_text() == "host secret"
    assert sorted(os.listdir(host)) == ["victim"]
    assert stat.S_IMODE(os.stat(host).st_mode) != 0o777
    assert os.readlink(r2 / "stolen") == str(victim)  # the hard-linked name of the old symlink stays one


def test_entries_that_clash_within_and_across_layers(tmp_path: Path, store: TemplateStore) -> None:
    """The last entry of a path wins (a dir over a dir only changes its attributes and keeps its contents),
    fifos are made, and directory mtimes are the image's after their contents are written."""
    layers = [
        [
            Entry("d", "dir", mode=0o755),
            Entry("d/keep", data=b"kept"),
            Entry("f", data=b"first"),
            Entry("f", data=b"second", mode=0o600, uid=1000),
            Entry("pipe", "fifo", mode=0o640),
            Entry("s", "symlink", link="d"),
        ],
        [
            Entry("d", "dir", mode=0o700, uid=1000, gid=1000),
            Entry("s", "symlink", link="f"),
            Entry("pipe", data=b"a file now"),
            Entry("f", "dir", mode=0o755),
        ],
    ]
    layout = image(tmp_path, layers)
    info = run(store.import_image(f"oci:{layout}:latest", name="clash"))
    r = store.rootfs(info.name)
    base = store.idmap.host_base
    st = os.lstat(r / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid - base, st.st_mtime) == (0o700, 1000, 0)
    assert (r / "d/keep").read_bytes() == b"kept"
    assert os.readlink(r / "s") == "f"
    assert (r / "pipe").read_bytes() == b"a file now"
    assert (r / "f").is_dir()
    one = image(tmp_path, [layers[0]], name="one")
    r1 = store.rootfs(run(store.import_image(f"oci:{one}:latest", name="one")).name)
    f = os.lstat(r1 / "f")
    assert (r1 / "f").read_bytes() == b"second"
    assert (stat.S_IMODE(f.st_mode), f.st_uid - base, f.st_nlink) == (0o600, 1000, 1)
    p = os.lstat(r1 / "pipe")
    assert stat.S_ISFIFO(p.st_mode) and stat.S_IMODE(p.st_mode) == 0o640 and p.st_uid == base


def test_tar_bombs_stop_at_the_caps(tmp_path: Path, store: TemplateStore) -> None:
    bomb = image(tmp_path, [BASE, [Entry("zeros", data=bytes(4 << 20))]], name="bomb")
    assert sum(f.stat().st_size for f in (bomb / "blobs/sha256").iterdir()) < 64 << 10  # small on the wire
    with pytest.raises(ImageTooLargeError, match="more than 1048576 bytes") as exc:
        run(store.import_image(f"oci:{bomb}:latest", name="bomb", budget=Budget(max_bytes=1 << 20)))
    assert exc.value.http_status == 413
    many = image(tmp_path, [BASE, [Entry(f"f{i}") for i in range(200)]], name="many")
    with pytest.raises(ImageTooLargeError, match="more than 100 files"):
        run(store.import_image(f"oci:{many}:latest", name="many", budget=Budget(max_files=100)))
    # a member of a type tarfile does not know is written as a file: its data counts too
    odd = io.BytesIO()
    with tarfile.open(fileobj=odd, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo("blob")
        ti.type, ti.size = b"Z", 4 << 20
        tar.addfile(ti, io.BytesIO(bytes(4 << 20)))
    odd_type = tmp_path / "odd-type"
    write_layout(odd_type, [odd.getvalue()])
    with pytest.raises(ImageTooLargeError, match="more than 1048576 bytes"):
        run(store.import_image(f"oci:{odd_type}:latest", name="odd", budget=Budget(max_bytes=1 << 20)))
    huge_name = image(tmp_path, [[Entry("x" * 100, pax={"comment": "y" * (2 << 20)})]], name="pax")
    with pytest.raises(UnsafeImageError, match="tar header"):
        run(store.import_image(f"oci:{huge_name}:latest", name="pax"))
    assert_nothing_left(store)


def test_cancelled_import_leaves_nothing(tmp_path: Path, store: TemplateStore) -> None:
    layout = image(tmp_path, [BASE, [Entry(f"many/f{i}", data=b"x" * 100) for i in range(5000)]])

    async def go() -> None:
        task: asyncio.Task[Any] | None = None
        loop = asyncio.get_running_loop()

        def progress(ev: Any) -> None:  # called from the unpacking thread
            if ev.step == "unpack" and "2/2" in ev.message and task is not None:
                loop.call_soon_threadsafe(task.cancel)

        task = asyncio.ensure_future(store.import_image(f"oci:{layout}:latest", name="c", progress=progress))
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert_nothing_left(store)
    assert len(list((store.root / "layers").iterdir())) == 1  # the first layer's stack was complete: kept
    assert not any(p.name.startswith(".tmp-") for p in store.root.iterdir())


# ------------------------------------------------------------------ registries


def test_registry_anonymous_and_with_auth(tmp_path: Path, store: TemplateStore) -> None:
    layout = image(tmp_path, [BASE, TOP], config=CONFIG)
    with registry(tmp_path / "open") as reg:
        reg.push(f"oci:{layout}:latest", "team/app:1")
        insecure = FetchOptions(tls_verify=False)
        info = run(store.import_image(reg.ref("team/app:1"), name="from-reg", options=insecure))
        assert (store.rootfs(info.name) / "etc/hosts.hard").exists()
        assert store.metadata(info.name)["image"]["reference"] == reg.ref("team/app:1")
        with pytest.raises(ImageNotFoundError):
            run(store.import_image(reg.ref("team/app:2"), name="x", options=insecure))
        with pytest.raises(RegistryUnreachableError, match="--insecure"):  # plain HTTP, TLS asked
            run(store.import_image(reg.ref("team/app:1"), name="x"))
    secret = "s3cret-Pa55"
    with registry(tmp_path / "auth", creds=f"bot:{secret}") as reg:
        reg.push(f"oci:{layout}:latest", "private/app:1")
        for opts in (FetchOptions(tls_verify=False), FetchOptions(creds="bot:wrong-" + secret, tls_verify=False)):
            with pytest.raises(RegistryAuthError) as exc:
                run(store.import_image(reg.ref("private/app:1"), name="x", options=opts))
            assert secret not in exc.value.message
        assert_nothing_left(store, keep={"from-reg"})
        info = run(
            store.import_image(
                reg.ref("private/app:1"), name="private", options=FetchOptions(creds=f"bot:{secret}", tls_verify=False)
            )
        )
        assert info.digest == store.get("from-reg").digest  # same image, same template
        authfile = tmp_path / "auth.json"
        auth = base64.b64encode(f"bot:{secret}".encode()).decode()
        authfile.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        opts = FetchOptions(authfile=authfile, tls_verify=False)
        assert run(store.import_image(reg.ref("private/app:1"), name="p2", options=opts)).digest == info.digest
    assert not list(store.root.rglob("auth.json"))  # the creds file went with the temp dir


def test_docker_daemon_transport(tmp_path: Path, store: TemplateStore) -> None:
    """docker-daemon: through a Docker daemon the test starts (its own sockets and roots, no host networking)."""
    layout = image(tmp_path, [BASE, TOP], config=CONFIG)
    skopeo_copy(f"oci:{layout}:latest", f"docker-archive:{tmp_path}/img.tar:test/img:1")
    with dockerd() as host:
        subprocess.run(["docker", "-H", host, "load", "-i", f"{tmp_path}/img.tar"], check=True, capture_output=True)
        opts = FetchOptions(daemon_host=host)
        info = run(store.import_image("docker-daemon:test/img:1", name="from-docker", options=opts))
        r = store.rootfs(info.name)
        assert (r / "etc/hosts.hard").exists()
        assert not (r / "etc/gone").exists()
        assert store.metadata(info.name)["user"] == "1000"
        with pytest.raises(ImageNotFoundError):
            run(store.import_image("docker-daemon:test/none:1", name="x", options=opts))
    with pytest.raises(RegistryUnreachableError):  # the daemon is gone
        run(store.import_image("docker-daemon:test/img:1", name="x", options=opts))
    assert_nothing_left(store, keep={"from-docker"})


# ------------------------------------------------------------------ CLI


def test_cli_import_image(tmp_path: Path) -> None:
    layout = image(tmp_path, [BASE, TOP], config=CONFIG)
    tdir = str(tmp_path / "t")

    def bb(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "branchbox.cli", "template", *args, "--templates-dir", tdir]
        return subprocess.run(argv, env=cli_env(), capture_output=True, text=True, check=False)

    ok = bb("import-image", f"oci:{layout}:latest", "--name", "cli")
    assert ok.returncode == 0, ok.stderr
    name, digest = ok.stdout.split()
    assert name == "cli"
    assert len(digest) == 64
    assert "layer 1/2" in ok.stderr
    assert "layer 2/2" in ok.stderr
    again = bb("import-image", f"oci:{layout}", "--name", "cli2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[1] == digest
    bad = bb("import-image", "docker:/x", "--name", "bad")
    assert bad.returncode == 1
    assert "invalid_image_reference" in bad.stderr
    listing = bb("ls")
    assert "cli2" in listing.stdout
    assert "image" in listing.stdout


# ------------------------------------------------------------------ through the daemon and the SDK

OCI_BUSYBOX = "oci-busybox"


@pytest.fixture(scope="session")
def oci_busybox_layout(busybox_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox rootfs as a 2-layer OCI image (a whiteout, an opaque dir, ENV/WORKDIR/USER). Deterministic:
    later runs' imports are cache hits."""
    top = [
        Entry("bin/.wh.vi"),
        Entry("etc/motd", data=b"from the second layer\n"),
        Entry("srv/app", "dir", mode=0o755, uid=APP_UID, gid=APP_UID),
        Entry("srv/app/README", data=b"app files\n", uid=APP_UID, gid=APP_UID),
        Entry("root/.wh..wh..opq"),
    ]
    layout = tmp_path_factory.mktemp("oci-busybox") / "layout"
    write_layout(
        layout,
        [dir_tar(busybox_rootfs), tar_bytes(top)],
        config={
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello from an image"],
            "WorkingDir": "/srv/app",
            "User": "app",
            "Cmd": ["/bin/sh"],
        },
    )
    return layout


@pytest.fixture(scope="session")
def oci_busybox_template(oci_busybox_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``oci_busybox_layout`` pushed to a local registry and imported from it (CLI's path, in process) into the
    tests' template store as ``oci-busybox``."""
    store = TemplateStore(templates_dir())
    with registry(tmp_path_factory.mktemp("oci-registry")) as reg:
        reg.push(f"oci:{oci_busybox_layout}:latest", "test/busybox:1")
        opts = FetchOptions(tls_verify=False)
        run(store.import_image(reg.ref("test/busybox:1"), name=OCI_BUSYBOX, options=opts))
    return OCI_BUSYBOX


@pytest.mark.root
def test_imported_image_runs_with_its_defaults(daemon: DaemonProc, oci_busybox_template: str) -> None:
    """ENV, WORKDIR and USER of the image apply to commands (pwd, env, id); files, root on request, and a fork."""
    meta = TemplateStore(templates_dir()).metadata(oci_busybox_template)
    assert (meta["source"], meta["user"], meta["workdir"]) == ("image", "app", "/srv/app")
    with Sandbox.create(template=oci_busybox_template, base_url=daemon.url, request_timeout=120) as sbx:
        r = sbx.commands.run("pwd; echo $GREETING; id -un; id -u; cat README /etc/motd; ls /bin/vi 2>&1 | wc -l")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.splitlines() == [
            "/srv/app",
            "hello from an image",
            "app",
            str(APP_UID),
            "app files",
            "from the second layer",
            "1",  # ls: /bin/vi: No such file or directory (the whiteout)
        ]
        assert "GREETING=hello from an image" in sbx.commands.run(["env"]).stdout
        assert sbx.commands.run("id -u", user="root").stdout == "0\n"
        assert sbx.commands.run("touch mine && stat -c %U mine").stdout == "app\n"  # /srv/app is app's in the image
        sbx.files.write("/srv/app/notes.txt", "written through the SDK\n")
        assert sbx.commands.run("cat notes.txt").stdout == "written through the SDK\n"
        (child,) = sbx.fork()
        assert isinstance(child, Sandbox), child
        with child:
            out = child.commands.run("pwd; id -un; cat notes.txt; echo $GREETING").stdout
            assert out.splitlines() == ["/srv/app", "app", "written through the SDK", "hello from an image"]


@pytest.mark.root
def test_import_through_the_api_and_sdk(daemon: DaemonProc, oci_busybox_layout: Path, tmp_path: Path) -> None:
    """Template.import_image: the daemon pulls from a registry (with credentials), streams progress, and the
    template runs; other transports, a registry in a blocked range and bad credentials are refused."""
    secret = "api-Pa55"
    events: list[dict[str, Any]] = []
    with registry(tmp_path / "reg", creds=f"bot:{secret}") as reg:
        reg.push(f"oci:{oci_busybox_layout}:latest", "test/busybox:api")
        ref = reg.ref("test/busybox:api")
        info = Template.import_image(
            ref, name="oci-busybox-api", username="bot", password=secret, insecure=True,
            on_event=events.append, base_url=daemon.url,
        )  # fmt: skip
        assert info.name == "oci-busybox-api"
        assert {e.get("step") for e in events} >= {"fetch"}
        with pytest.raises(PermissionDeniedError) as denied:
            Template.import_image(ref, name="x", username="bot", password="nope", insecure=True, base_url=daemon.url)
        assert denied.value.code == "registry_auth_failed"
        assert "nope" not in denied.value.message
    with Sandbox.create(template="oci-busybox-api", base_url=daemon.url, request_timeout=120) as sbx:
        assert sbx.commands.run("id -un; pwd").stdout == "app\n/srv/app\n"
    for bad, code in (
        (f"oci:{oci_busybox_layout}", "invalid_image_reference"),  # host paths are the CLI's, not the API's
        ("docker://169.254.169.254/latest/meta-data:1", "invalid_image_reference"),  # blocked range, no connect
        ("docker-daemon:busybox:1", "invalid_image_reference"),
    ):
        with pytest.raises(SdkBadRequest) as exc:
            Template.import_image(bad, name="x", base_url=daemon.url)
        assert exc.value.code == code, (bad, exc.value)
    names = [t.name for t in TemplateStore(templates_dir()).list()]
    assert "x" not in names
