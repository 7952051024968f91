"""Git workspaces on the real container backend against real git servers on loopback (git daemon, and
git http-backend with HTTP Basic auth), with a generated repository of 20 000 files and 300 commits."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from branchbox import errors
from branchbox.core.manager import Manager
from branchbox.core.settings import ManagerSettings, WorkspaceSettings
from branchbox.models import TemplateInfo
from branchbox.workspaces import WorkspaceStatus, parse_repo_url
from branchbox.workspaces.gitcmd import GitResult, base_env, classify
from branchbox.workspaces.locks import SingleFlight
from branchbox.workspaces.mirror import config_text
from branchbox.workspaces.service import WorkspaceService
from branchbox.workspaces.testing import CuttingProxy, GitDaemon, HttpGitServer, commit_file, generate_repo
from tests.conftest import GIT_SERVERS, TEST_ROOT, make_settings

pytestmark = [pytest.mark.root, pytest.mark.template]


@pytest.fixture(scope="session")
def git_base() -> Iterator[Path]:
    """A directory of served repositories; ``repo.git`` (20 000 files, 300 commits) is generated once."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    base = TEST_ROOT / f"git-{os.getpid()}-{secrets.token_hex(3)}"
    base.mkdir()
    try:
        generate_repo(base / "repo.git")
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def git_daemon(git_base: Path) -> Iterator[GitDaemon]:
    d = GitDaemon(git_base).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def fresh_repo(git_base: Path) -> Iterator[str]:
    """A private copy of repo.git (tests that push to it); returns its name under the served dir."""
    name = f"r-{secrets.token_hex(4)}.git"
    shutil.copytree(git_base / "repo.git", git_base / name, symlinks=True)
    try:
        yield name
    finally:
        shutil.rmtree(git_base / name, ignore_errors=True)


@pytest.fixture
def proxy(git_daemon: GitDaemon) -> Iterator[CuttingProxy]:
    """A counting (and, on demand, cutting) proxy in front of the git daemon."""
    p = CuttingProxy(git_daemon.port, None).start()
    try:
        yield p
    finally:
        p.stop()


@contextlib.asynccontextmanager
async def open_manager(settings: ManagerSettings) -> AsyncIterator[tuple[Manager, WorkspaceService]]:
    """A Manager with the workspace service added, as the daemon runs it (daemon/serve.py)."""
    m = Manager(settings)
    workspaces = m.add_service(WorkspaceService(m))
    async with m:
        yield m, workspaces


@pytest.fixture
async def opened(default_template: TemplateInfo, data_dir: Path) -> AsyncIterator[tuple[Manager, WorkspaceService]]:
    async with open_manager(make_settings(data_dir)) as pair:
        yield pair


@pytest.fixture
def wm(opened: tuple[Manager, WorkspaceService]) -> Manager:
    return opened[0]


@pytest.fixture
def workspaces(opened: tuple[Manager, WorkspaceService]) -> WorkspaceService:
    return opened[1]


async def sh(m: Manager, sid: str, cmd: str, cwd: str) -> str:
    r = await m.exec(sid, ["sh", "-c", cmd], cwd=cwd, timeout=60)
    assert r.exit_code == 0, f"{cmd}: {r.stdout.decode()} {r.stderr.decode()}"
    return r.stdout.decode()


def git_host(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, env=base_env()
    ).stdout.decode()


# ------------------------------------------------------------------ URL handling (no server needed)


def test_parse_repo_url_strips_credentials() -> None:
    r = parse_repo_url("https://alice:s3cr3t-token@Example.com/Org/Repo.git")
    assert r.url == "https://example.com/Org/Repo.git"
    assert r.name == "Repo"
    assert r.auth_header == "Authorization: Basic " + base64.b64encode(b"alice:s3cr3t-token").decode()
    assert "s3cr3t-token" not in repr(r)
    assert r.redact("failed for s3cr3t-token") == "failed for ***"
    assert parse_repo_url("https://example.com/Org/Repo").key == r.key  # same cache entry with or without .git
    header = dict(parse_repo_url("https://example.com/x.git", token="tok1234").git_config())["http.extraHeader"]
    assert header.startswith("Authorization: Basic ")
    assert parse_repo_url("git@github.com:org/repo.git").url == "git@github.com:org/repo.git"
    for bad in ("", "file:///etc", "/srv/repo.git", "ftp://h/x", "ext::sh -c x", "https://", "https://h/",
                "https://h/x y", "ssh://u:pw@h/x", "-oProxyCommand=id@h:x", "ssh://-oProxyCommand=id/x"):  # fmt: skip
        with pytest.raises(errors.RepositoryUrlError):
            parse_repo_url(bad)
    with pytest.raises(errors.RepositoryUrlError):
        parse_repo_url("git://h/x.git", token="abcd")  # credentials only for http(s)


async def test_single_flight_shares_one_call_and_survives_a_cancelled_caller() -> None:
    sf, calls = SingleFlight(), []

    async def fn() -> int:
        calls.append(1)
        await asyncio.sleep(0.05)
        return 42

    first = asyncio.create_task(sf.do("k", fn))
    others = [asyncio.create_task(sf.do("k", fn)) for _ in range(5)]
    await asyncio.sleep(0.01)
    first.cancel()
    assert await asyncio.gather(*others) == [42] * 5 and len(calls) == 1

    async def bad() -> int:
        raise errors.RefNotFoundError("gone")

    with pytest.raises(errors.RefNotFoundError):
        await sf.do("b", bad)
    assert await sf.do("k", fn) == 42 and len(calls) == 2  # a finished call is not reused


@pytest.mark.parametrize(
    ("stderr", "cls"),
    [
        ("fatal: unable to access 'https://h/x.git/': Could not resolve host: h", errors.RepositoryUnreachableError),
        ("fatal: early EOF\nfatal: index-pack failed", errors.RepositoryUnreachableError),
        ("fatal: unable to access 'https://h/x/': The requested URL returned error: 403", errors.RepositoryAuthError),
        ("fatal: could not read Username for 'https://h': terminal prompts disabled", errors.RepositoryAuthError),
        ("fatal: remote error: access denied or repository not exported: /x.git", errors.RepositoryNotFoundError),
        (
            "fatal: unable to access 'https://h/x/': The requested URL returned error: 404",
            errors.RepositoryNotFoundError,
        ),
        ("fatal: couldn't find remote ref refs/heads/nope", errors.RefNotFoundError),
        ("fatal: something else entirely (4013 objects)", errors.GitError),
    ],
)
def test_git_failures_map_to_typed_errors(stderr: str, cls: type[errors.BranchboxError]) -> None:
    exc = classify(GitResult(128, b"", stderr), what="fetching", url="https://h/x.git")
    assert type(exc) is cls and "fetching" in exc.message


def test_config_values_are_quoted(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text(config_text({"remote.origin.url": 'https://h/a"b\\c;d#e.git', "core.bare": "true"}))
    out = subprocess.run(["git", "config", "-f", str(cfg), "--get", "remote.origin.url"], capture_output=True,
                         check=True, env=base_env()).stdout.decode()  # fmt: skip
    assert out == 'https://h/a"b\\c;d#e.git\n'


# ------------------------------------------------------------------ the cache, on the real backend


async def test_first_and_repeated_workspace(
    wm: Manager, workspaces: WorkspaceService, git_daemon: GitDaemon, git_base: Path
) -> None:
    url = git_daemon.url("repo.git")
    tip = git_host(git_base / "repo.git", "rev-parse", "main").strip()
    first = await workspaces.create(url, branch="main")
    assert first.status is WorkspaceStatus.READY and first.commit == tip and not first.cached
    assert first.path == "/workspace/repo" and first.sandbox_id is not None
    assert {"fetch", "checkout", "layer", "sandbox", "total"} <= set(first.timings)
    assert "resolve" not in first.timings  # the first fetch resolves the branch: no separate ls-remote
    sid = first.sandbox_id
    # a normal checkout: clean status, the commit in the log, HEAD on the branch, 20 000 files
    assert await sh(wm, sid, "git status --porcelain", first.path) == ""
    assert (await sh(wm, sid, "git log -1 --format=%H", first.path)).strip() == tip
    assert (await sh(wm, sid, "git rev-parse --abbrev-ref HEAD", first.path)).strip() == "main"
    assert (await sh(wm, sid, "git ls-files | wc -l", first.path)).strip() == "20000"
    assert (await sh(wm, sid, "git remote get-url origin", first.path)).strip() == url
    # the agent can work: edit, commit, branch (and the index was not rewritten by the first status)
    await sh(wm, sid, "echo change >> d000/f00000.txt && git status --porcelain | grep -q 'M d000/f00000.txt'",
             first.path)  # fmt: skip
    commit_cmd = "git -c user.name=a -c user.email=a@b commit -qam 'agent change' && git switch -qc feature"
    await sh(wm, sid, commit_cmd + " && git log --oneline -1 | grep -q 'agent change'", first.path)
    assert (await sh(wm, sid, "git rev-parse --abbrev-ref HEAD", first.path)).strip() == "feature"

    # repeated: the same commit layer, no fetch and no checkout; its own copy-on-write tree, on the spare that
    # booted on this commit's layer after the first create (in the background: wait for it, on a loaded host too)
    await asyncio.wait_for(wm.wait_layer_spares(), 60)
    again = await workspaces.create(url, branch="main")
    assert again.cached and again.commit == tip and "fetch" not in again.timings and "checkout" not in again.timings
    assert (await wm.get(again.sandbox_id or "")).source == "warm"
    assert again.sandbox_id != sid
    assert await sh(wm, again.sandbox_id or "", "git status --porcelain; git log -1 --format=%s", again.path) == (
        "commit 299\n"
    )
    # the agent's commit in the first workspace did not leak into the layer
    assert (await sh(wm, again.sandbox_id or "", "git branch --list feature", again.path)) == ""

    # a pinned commit the mirror has (after the history arrived) needs no server at all
    await workspaces.wait_background()
    old = git_host(git_base / "repo.git", "rev-parse", "main~7").strip()
    pinned = await workspaces.create(url, commit=old[:12], path="/root/src")
    assert pinned.commit == old and "fetch" not in pinned.timings and "resolve" not in pinned.timings
    out = await sh(wm, pinned.sandbox_id or "", "git status --porcelain; git rev-parse HEAD; git log --oneline | wc -l",
                   "/root/src")  # fmt: skip
    assert out.split() == [old, "293"]  # full history (blobless) once the background fetch is done

    listed = await workspaces.list()
    assert {w.id for w in listed} == {first.id, again.id, pinned.id}
    await workspaces.delete(again.id)
    with pytest.raises(errors.SandboxNotFoundError):
        await wm.get(again.sandbox_id or "")
    with pytest.raises(errors.WorkspaceNotFoundError):
        await workspaces.get(again.id)


async def test_concurrent_requests_do_one_fetch(workspaces: WorkspaceService, proxy: CuttingProxy, fresh_repo: str,
                                                git_daemon: GitDaemon) -> None:  # fmt: skip
    url = git_daemon.url(fresh_repo, port=proxy.port)
    results = await asyncio.gather(*(workspaces.create(url, branch="main") for _ in range(20)))
    assert all(r.status is WorkspaceStatus.READY for r in results)
    assert len({r.commit for r in results}) == 1 and len({r.sandbox_id for r in results}) == 20
    assert sum("fetch" in r.timings for r in results) == 1
    assert sum("checkout" in r.timings for r in results) == 1
    await workspaces.wait_background()
    # one fetch (it resolves the branch of a repository the cache lacks) and one background history fetch
    assert proxy.connections == 2, proxy.connections


async def test_updates_and_force_push_are_seen(wm: Manager, workspaces: WorkspaceService, git_daemon: GitDaemon,
                                               git_base: Path, fresh_repo: str) -> None:  # fmt: skip
    repo, url = git_base / fresh_repo, git_daemon.url(fresh_repo)
    a = await workspaces.create(url, branch="main")
    await workspaces.wait_background()  # the history arrived: the next commit needs a fetch of its own
    b_commit = commit_file(repo, "main", "NEW.txt", "new content\n", message="a new commit")
    b = await workspaces.create(url, branch="main")
    assert b.commit == b_commit != a.commit and not b.cached and "fetch" in b.timings
    assert await sh(wm, b.sandbox_id or "", "git status --porcelain; cat NEW.txt", b.path) == "new content\n"
    # a new commit of a known repository is a small layer holding the difference, above the first one
    layers = {x.layer_id: x for x in workspaces._db.layers()}
    b_layer = next(x for x in layers.values() if x.commit_id == b_commit)
    assert len(b_layer.chain) == 1 and layers[b_layer.chain[0]].commit_id == a.commit
    assert not (wm.layer_path(b_layer.layer_id) / "workspace/repo/d000").exists()
    out = await sh(
        wm, b.sandbox_id or "", "git ls-files | wc -l; git log -2 --format=%s; git log | grep -c ^commit", b.path
    )
    assert out.splitlines() == ["20001", "a new commit", "commit 299", "301"]  # full history now: no shallow file
    # a deleted file is a whiteout in the difference layer
    d_commit = commit_file(repo, "main", "NEW.txt", "", message="remove", delete=True)
    d = await workspaces.create(url, branch="main")
    assert d.commit == d_commit
    assert (
        await sh(wm, d.sandbox_id or "", "git status --porcelain; ls NEW.txt 2>&1 | grep -c 'No such'", d.path) == "1\n"
    )
    # rewrite history: main now has one unrelated root commit
    c_commit = commit_file(repo, "main", "ONLY.txt", "rewritten\n", parent="", message="rewritten history")
    c = await workspaces.create(url, branch="main")
    assert c.commit == c_commit
    out = await sh(wm, c.sandbox_id or "", "git status --porcelain; git log --format=%s; ls", c.path)
    assert out == "rewritten history\nONLY.txt\n"
    # the old workspaces are untouched
    assert (await sh(wm, a.sandbox_id or "", "git rev-parse HEAD", a.path)).strip() == a.commit


async def test_bad_requests_have_stable_errors(
    wm: Manager, workspaces: WorkspaceService, git_daemon: GitDaemon, git_base: Path
) -> None:
    url = git_daemon.url("repo.git")
    with pytest.raises(errors.RepositoryUrlError):
        await workspaces.create("file:///etc", branch="main")
    with pytest.raises(errors.RepositoryUrlError):
        await workspaces.create(str(git_base / "repo.git"), branch="main")
    with pytest.raises(errors.BadRequestError):
        await workspaces.create(url, branch="main", commit="abcd")
    with pytest.raises(errors.BadRequestError):
        await workspaces.create(url, branch="bad..name")
    with pytest.raises(errors.BadRequestError):
        await workspaces.create(url, branch="main", path="/etc/x")
    with pytest.raises(errors.TemplateNotFoundError):
        await workspaces.create(url, branch="main", template="no-such-template")
    with pytest.raises(errors.RefNotFoundError):
        await workspaces.create(url, branch="no-such-branch")
    with pytest.raises(errors.RefNotFoundError):
        await workspaces.create(url, commit="0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(errors.RepositoryNotFoundError):
        await workspaces.create(git_daemon.url("missing.git"), branch="main")
    closed = CuttingProxy(1, None)  # a port nobody listens on
    closed.stop()
    with pytest.raises(errors.RepositoryUnreachableError):
        await workspaces.create(f"git://127.0.0.1:{closed.port}/repo.git", branch="main")
    assert await workspaces.list() == []  # failed requests leave no record (wait=True)
    assert await wm.list() == []
    # wait=False: the error is kept in the record
    ws = await workspaces.create(url, branch="nope", wait=False)
    assert ws.status is WorkspaceStatus.CREATING
    await asyncio.sleep(0)
    while (ws := await workspaces.get(ws.id)).status is WorkspaceStatus.CREATING:
        await asyncio.sleep(0.02)
    assert ws.status is WorkspaceStatus.ERROR and ws.error is not None and ws.error["code"] == "ref_not_found"
    await workspaces.delete(ws.id)


async def test_server_dies_mid_fetch(wm: Manager, workspaces: WorkspaceService, proxy: CuttingProxy,
                                     git_daemon: GitDaemon, git_base: Path, fresh_repo: str) -> None:  # fmt: skip
    url = git_daemon.url(fresh_repo, port=proxy.port)
    mirrors = wm.settings.data_dir / "git" / "mirrors"
    # 1. the first fetch of a new repository is cut: clear error, no mirror left behind
    proxy.cut_after = 300_000
    with pytest.raises(errors.RepositoryUnreachableError) as ei:
        await workspaces.create(url, branch="main")
    assert "closed the connection" in str(ei.value) and proxy.cut_count >= 1
    assert list(mirrors.iterdir()) == []
    # 2. the next request works
    proxy.cut_after = None
    ok = await workspaces.create(url, branch="main")
    await workspaces.wait_background()
    mirror = next(mirrors.iterdir())
    refs_before = git_host(mirror, "for-each-ref")
    # 3. a fetch into an existing mirror is cut (the lazy fetch of a big new blob): the mirror stays as it was
    commit_file(git_base / fresh_repo, "main", "big.bin", secrets.token_hex(400_000), message="big")
    proxy.cut_after = 100_000
    with pytest.raises(errors.RepositoryUnreachableError):
        await workspaces.create(url, branch="main")
    git_host(mirror, "fsck", "--connectivity-only", "--no-progress")
    assert not [p for p in (mirror / "objects" / "pack").iterdir() if p.name.startswith("tmp_")]
    assert git_host(mirror, "for-each-ref").count("refs/heads/main") == refs_before.count("refs/heads/main")
    proxy.cut_after = None
    new = await workspaces.create(url, branch="main")
    assert new.commit != ok.commit
    assert await sh(wm, new.sandbox_id or "", "git status --porcelain; wc -c < big.bin", new.path) == "800000\n"


async def test_credentials_are_never_stored(
    wm: Manager, workspaces: WorkspaceService, git_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = "tok-" + secrets.token_hex(12)
    server = HttpGitServer(git_base, token).start()
    try:
        secret_url = server.url("repo.git", credentials=f"git:{token}")
        ws = await workspaces.create(secret_url, branch="main")
        assert ws.repository_url == server.url("repo.git") and token not in repr(ws)
        assert server.seen_authorization  # git sent the header from its environment
        await workspaces.wait_background()
        # the token as a separate argument works too (same cache entry)
        ws2 = await workspaces.create(server.url("repo.git"), branch="main", token=token, path="/workspace/b")
        assert ws2.status is WorkspaceStatus.READY
        # without credentials: refused, even for a commit the cache has
        with pytest.raises(errors.RepositoryAuthError):
            await workspaces.create(server.url("repo.git"), branch="main")
        with pytest.raises(errors.RepositoryAuthError):
            await workspaces.create(server.url("repo.git"), commit=ws.commit)
        with pytest.raises(errors.RepositoryAuthError) as ei:
            await workspaces.create(server.url("repo.git", credentials="git:wrong-token-1234"), branch="main")
        assert "wrong-token-1234" not in str(ei.value)
        out = await sh(wm, ws.sandbox_id or "", "git config --get remote.origin.url; cat .git/config", ws.path)
        assert token not in out
        # nothing on disk holds the token or its base64 form (mirror config, layers, SQLite)
        b64 = base64.b64encode(f"git:{token}".encode())
        await wm.wait_background()
        hits = subprocess.run(["grep", "-rlaF", "-e", token, "-e", b64.decode(), str(wm.settings.data_dir)],
                              capture_output=True, check=False)  # fmt: skip
        assert hits.stdout == b"", hits.stdout
        assert token not in caplog.text and b64.decode() not in caplog.text
    finally:
        server.stop()


async def test_lru_eviction_by_budget(default_template: TemplateInfo, data_dir: Path, git_daemon: GitDaemon,
                                      git_base: Path) -> None:  # fmt: skip
    settings = make_settings(data_dir, workspaces=WorkspaceSettings(cache_budget_mb=1, allow_cidrs=GIT_SERVERS))
    url = git_daemon.url("repo.git")
    async with open_manager(settings) as (m, workspaces):
        a = await workspaces.create(url, branch="main")
        await workspaces.wait_background()
        await workspaces.delete(a.id)
        b = await workspaces.create(url, commit=git_host(git_base / "repo.git", "rev-parse", "main~1").strip())
        await workspaces.wait_background()
        await m.wait_background()
        git_layers = [x for x in os.listdir(data_dir / "layers") if not x.endswith(".tmp")]
        assert len(git_layers) == 1  # the first (unused) layer went; the newest stays even above the budget
        assert not (data_dir / "git" / "mirrors").exists() or list((data_dir / "git" / "mirrors").iterdir()) == []
        # an evicted repository is simply fetched again
        c = await workspaces.create(url, branch="main")
        assert not c.cached and "fetch" in c.timings
        assert await sh(m, c.sandbox_id or "", "git status --porcelain | wc -l", c.path) == "0\n"
        assert b.status is WorkspaceStatus.READY


async def test_layers_survive_a_restart(default_template: TemplateInfo, data_dir: Path, git_daemon: GitDaemon) -> None:
    url = git_daemon.url("repo.git")
    settings = make_settings(data_dir)
    async with open_manager(settings) as (_, workspaces):
        first = await workspaces.create(url, branch="main")
        await workspaces.wait_background()
    async with open_manager(settings) as (_, workspaces):
        again = await workspaces.create(url, branch="main")
        assert again.cached and again.commit == first.commit
        assert (await workspaces.get(first.id)).status is WorkspaceStatus.READY


async def test_fork_of_a_workspace_keeps_the_agents_work(
    wm: Manager, workspaces: WorkspaceService, git_daemon: GitDaemon
) -> None:
    ws = await workspaces.create(git_daemon.url("repo.git"), branch="main")
    sid = ws.sandbox_id or ""
    await sh(wm, sid, "echo wip > WIP.txt && git add WIP.txt && git -c user.name=a -c user.email=a@b commit -qm wip",
             ws.path)  # fmt: skip
    kids = await wm.fork(sid, count=2)
    for kid in kids:
        assert not isinstance(kid, errors.BranchboxError), kid
        out = await sh(wm, kid.id, "git status --porcelain; git log -1 --format=%s; cat WIP.txt", ws.path)
        assert out == "wip\nwip\n"


async def test_ref_ttl_reuses_a_branch_resolution(default_template: TemplateInfo, data_dir: Path,
                                                  proxy: CuttingProxy, git_daemon: GitDaemon) -> None:  # fmt: skip
    from branchbox.daemon.config import load_config

    cfg = load_config(None, env={"BRANCHBOX_GIT_CACHE_BUDGET_MB": "5", "BRANCHBOX_GIT_REF_TTL": "60"})
    assert cfg.manager_settings().workspaces == WorkspaceSettings(cache_budget_mb=5, ref_ttl=60.0)
    url = git_daemon.url("repo.git", port=proxy.port)
    async with open_manager(
        make_settings(data_dir, workspaces=WorkspaceSettings(ref_ttl=60.0, allow_cidrs=GIT_SERVERS))
    ) as (_, workspaces):
        await workspaces.create(url, branch="main")
        await workspaces.wait_background()
        await workspaces.create(url, branch="main")  # asks the server (ls-remote) once ...
        before = proxy.connections
        again = await workspaces.create(url, branch="main")  # ... then reuses the answer for 60 s
        assert again.cached and proxy.connections == before
