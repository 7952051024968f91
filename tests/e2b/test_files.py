"""Files through the unmodified e2b SDK (sync and async) against a real daemon: envd's /files and the
filesystem.Filesystem service, signed URLs."""

from __future__ import annotations

import io
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from e2b.exceptions import FileNotFoundException, NotFoundException

from e2b import AsyncSandbox, FileType, Sandbox
from tests.e2b.conftest import E2BDaemon

pytestmark = pytest.mark.timeout(300)


def test_write_read_one_and_many(sbx: Sandbox) -> None:
    f = sbx.files
    info = f.write("/tmp/a.txt", "hello")
    assert (info.name, info.path, info.type) == ("a.txt", "/tmp/a.txt", FileType.FILE)
    assert f.read("/tmp/a.txt") == "hello"
    # a relative path is under the user's home (root's here), as envd resolves it
    assert f.write("rel.bin", b"\x00\x01\xff").path == "/root/rel.bin"
    assert f.read("/root/rel.bin", format="bytes") == bytearray(b"\x00\x01\xff")
    many = f.write_files([{"path": "/tmp/m/one", "data": "1"}, {"path": "/tmp/m/deep/two", "data": b"2"}])
    assert [w.path for w in many] == ["/tmp/m/one", "/tmp/m/deep/two"]
    assert f.read("/tmp/m/deep/two") == "2"
    # a file-like body goes as application/octet-stream, streamed; gzip too
    payload = bytes(range(256)) * 81920  # 20 MiB: over the daemon's JSON body limit (16 MiB), an upload
    f.write("/tmp/big.bin", io.BytesIO(payload))
    assert bytes(f.read("/tmp/big.bin", format="bytes")) == payload
    assert b"".join(f.read("/tmp/big.bin", format="stream")) == payload
    f.write("/tmp/z.txt", "zip" * 1000, gzip=True)
    assert f.read("/tmp/z.txt") == "zip" * 1000
    with pytest.raises(FileNotFoundException):
        f.read("/tmp/missing")


def test_list_stat_mkdir_rename_remove(sbx: Sandbox) -> None:
    f = sbx.files
    f.write_files([{"path": "/w/x.txt", "data": "12345"}, {"path": "/w/sub/y.txt", "data": "y"}])
    sbx.commands.run("ln -s /w/x.txt /w/link")
    top = {e.name: e for e in f.list("/w")}
    assert set(top) == {"x.txt", "sub", "link"}
    assert (top["x.txt"].type, top["x.txt"].size, top["sub"].type) == (FileType.FILE, 5, FileType.DIR)
    assert top["link"].type == FileType.SYMLINK and top["link"].symlink_target == "/w/x.txt"
    assert sorted(e.path for e in f.list("/w", depth=2)) == ["/w/link", "/w/sub", "/w/sub/y.txt", "/w/x.txt"]
    info = f.get_info("/w/x.txt")
    assert (info.size, info.permissions, info.mode) == (5, "-rw-r--r--", 0o644)
    assert (info.owner, info.group) == ("root", "root")
    # owner and group are the sandbox's names (its own /etc/passwd and /etc/group), the number when it has none
    sbx.commands.run("useradd -M -u 4321 meta && groupadd -g 4322 crew && chown meta:crew /w/x.txt")
    sbx.commands.run("chmod 4750 /w/x.txt && chown 7777:7778 /w/sub && touch -h -d @1700000000 /w/link")
    info = f.get_info("/w/x.txt")
    assert (info.owner, info.group, info.permissions, info.mode) == ("meta", "crew", "-rwsr-x---", 0o4750)
    listed = {e.name: e for e in f.list("/w")}
    assert (listed["x.txt"].owner, listed["x.txt"].group) == ("meta", "crew")
    assert (listed["sub"].owner, listed["sub"].group, listed["sub"].permissions) == ("7777", "7778", "drwxr-xr-x")
    assert listed["link"].modified_time.timestamp() == 1700000000  # the link's own time, not its target's
    assert listed["link"].permissions == "lrwxrwxrwx" and listed["link"].symlink_target == "/w/x.txt"
    assert abs(info.modified_time.timestamp() - time.time()) < 3600
    assert f.exists("/w/x.txt") and not f.exists("/w/nope")
    assert f.make_dir("/w/new/deeper") is True
    assert f.make_dir("/w/new/deeper") is False  # it exists
    moved = f.rename("/w/x.txt", "/w/new/x.txt")
    assert moved.path == "/w/new/x.txt" and not f.exists("/w/x.txt")
    f.remove("/w/sub")  # a directory, with what it holds
    assert not f.exists("/w/sub")
    with pytest.raises(NotFoundException):
        f.get_info("/w/sub")
    with pytest.raises(NotFoundException):
        f.list("/w/sub")


def test_signed_urls(sbx: Sandbox, e2b_env: E2BDaemon) -> None:
    sbx.files.write("/tmp/s.txt", "signed")
    down = sbx.download_url("/tmp/s.txt", use_signature_expiration=60)
    assert httpx.get(down).text == "signed"  # no headers: the signature is the credential
    up = sbx.upload_url("/tmp/up.txt")
    assert httpx.post(up, files={"file": ("ignored", b"uploaded")}).status_code == 200
    assert sbx.files.read("/tmp/up.txt") == "uploaded"
    # the signature covers the path, the operation and the expiry: change one and nothing opens
    q = {k: v[0] for k, v in parse_qs(urlsplit(down).query).items()}
    base = f"{e2b_env.url}/files?"
    assert httpx.get(base + urlencode({**q, "path": "/etc/shadow"})).status_code == 401
    assert httpx.post(base + urlencode(q), files={"file": ("x", b"x")}).status_code == 401
    assert httpx.get(base + urlencode({**q, "signature_expiration": str(int(time.time()) + 999)})).status_code == 401
    expired = sbx.download_url("/tmp/s.txt", use_signature_expiration=-10)
    assert httpx.get(expired).status_code == 401
    assert sbx.files.read("/tmp/s.txt") == "signed"


async def test_async_files(e2b_env: E2BDaemon) -> None:
    sbx = await AsyncSandbox.create("default", timeout=120)
    try:
        f = sbx.files
        await f.write("/tmp/a", "async")
        assert await f.read("/tmp/a") == "async"
        await f.write_files([{"path": "/tmp/b", "data": b"b"}, {"path": "/tmp/c", "data": "c"}])
        assert {e.name for e in await f.list("/tmp")} >= {"a", "b", "c"}
        assert await f.exists("/tmp/b") and not await f.exists("/tmp/zz")
        info = await f.get_info("/tmp/a")
        assert (info.size, info.owner, info.group) == (5, "root", "root")
        assert await f.make_dir("/tmp/d") is True
        await f.rename("/tmp/a", "/tmp/d/a")
        assert await f.read("/tmp/d/a") == "async"
        await f.remove("/tmp/d")
        assert not await f.exists("/tmp/d")
    finally:
        await sbx.kill()


def test_file_metadata_is_kept_as_extended_attributes(sbx: Sandbox, e2b_env: E2BDaemon) -> None:
    f = sbx.files
    written = f.write("/tmp/meta.txt", "x", metadata={"Owner": "me", "job": "42"})
    assert written.metadata == {"owner": "me", "job": "42"}  # keys lowercased, as envd does
    assert f.get_info("/tmp/meta.txt").metadata == {"owner": "me", "job": "42"}
    f.write("/tmp/meta.txt", "overwritten")  # a write without metadata keeps it (envd writes in place)
    f.write("/tmp/meta.txt", "again", metadata={"job": "43"}, use_octet_stream=False)  # multipart: merged
    assert f.get_info("/tmp/meta.txt").metadata == {"owner": "me", "job": "43"}
    assert f.read("/tmp/meta.txt") == "again"
    f.write_files([{"path": "/tmp/m/a", "data": "a"}, {"path": "/tmp/m/b", "data": "b"}], metadata={"batch": "1"})
    f.write("/tmp/m/plain", "p")
    listed = {e.name: e.metadata for e in f.list("/tmp/m")}
    assert listed == {"a": {"batch": "1"}, "b": {"batch": "1"}, "plain": None}
    xattr = "import os; print(os.getxattr('/tmp/m/a', 'user.e2b.batch').decode(), end='')"
    assert sbx.commands.run(f'python3 -c "{xattr}"').stdout == "1"  # where envd keeps it
    # bad metadata is 400 in envd's shape and writes nothing
    detail = httpx.get(f"{e2b_env.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": e2b_env.key}).json()
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": detail["envdAccessToken"]}
    url = f"{e2b_env.url}/files?path=/tmp/bad.txt"
    for extra in ({"X-Metadata-k": "v" * 5000}, {f"X-Metadata-k{i}": "v" for i in range(65)}):
        r = httpx.post(url, content=b"x", headers={**headers, **extra, "content-type": "application/octet-stream"})
        assert r.status_code == 400 and set(r.json()) == {"code", "message"}, r.text
    assert not f.exists("/tmp/bad.txt")


async def test_async_file_metadata(e2b_env: E2BDaemon) -> None:
    sbx = await AsyncSandbox.create("default", timeout=60)
    try:
        await sbx.files.write("/tmp/am.txt", "x", metadata={"k": "v"})
        assert (await sbx.files.get_info("/tmp/am.txt")).metadata == {"k": "v"}
    finally:
        await sbx.kill()
