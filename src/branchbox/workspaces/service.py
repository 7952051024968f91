"""Git workspaces: a sandbox booted on a cached commit layer of a repository (docs/workspaces.md).

One instance per Manager, built on it and added to it (the Manager starts it after its recovery and closes it
before its own services: ``workspaces = manager.add_service(WorkspaceService(manager))``, then ``async with manager``);
the daemon hands it to the HTTP app (``create_app(..., workspaces=)``). HTTP, CLI and SDK call
:meth:`WorkspaceService.create`, :meth:`get`, :meth:`list` and :meth:`delete`.

Request path::

    resolve   branch -> commit: ``git ls-remote`` (shared by concurrent callers; skipped within ``ref_ttl``);
              a pinned commit needs no server unless the caller's credentials were never checked for it
    layer?    a commit layer for (repository, commit, branch, path) exists -> boot on it (the fast path)
    lock      per repository (asyncio + flock); again: layer? (someone else may have built it meanwhile)
    fetch     mirror missing: shallow first fetch (then history in the background); commit missing: fetch
    checkout  read-tree into a staging dir, write .git, chown, hard-link packs
    layer     seal the staging dir as an immutable layer, record it (pinned) durably
    sandbox   boot a sandbox on [layer, template] (a fresh upper: the checkout is copy-on-write)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import branchbox.workspaces.layers as layer_fs
import branchbox.workspaces.sshauth as sshauth
from branchbox.core.snapshots import new_layer_id
from branchbox.errors import (
    BadRequestError,
    BranchboxError,
    GitError,
    RefNotFoundError,
    SandboxNotFoundError,
    WorkspaceNotFoundError,
)
from branchbox.storage.fsutil import disk_usage, syncfs
from branchbox.timing import PhaseTimer
from branchbox.workspaces.checkout import build_checkout, build_diff
from branchbox.workspaces.host import WorkspaceHost
from branchbox.workspaces.locks import RepoLocks, SingleFlight
from branchbox.workspaces.mirror import Mirror, check_access, default_branch, ls_remote
from branchbox.workspaces.models import WorkspaceInfo, WorkspaceStatus
from branchbox.workspaces.records import CommitLayer, WorkspaceRecords
from branchbox.workspaces.urls import (
    RepoUrl,
    check_branch,
    check_commit,
    check_sandbox_path,
    parse_repo_url,
    with_ssh_auth,
)

log = logging.getLogger("branchbox.workspaces")
MAX_DEPTH = 1_000_000
MAX_DIFF_CHAIN = 8  # a commit layer holding only a difference sits on at most 7 others; deeper: a full checkout
MAX_DIFF_FILES = 2000  # more changed files than this: a full checkout


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _consume(task: asyncio.Task[WorkspaceInfo]) -> None:
    if not task.cancelled():
        task.exception()


def new_workspace_id() -> str:
    return "ws-" + secrets.token_hex(8)


class WorkspaceService:
    def __init__(self, manager: WorkspaceHost) -> None:
        self._m = manager
        self.settings = manager.settings.workspaces
        self.root = manager.settings.data_dir / "git"
        self._records: WorkspaceRecords | None = None
        self._locks = RepoLocks(self.root / "locks")
        self._flight = SingleFlight()
        self._salt = secrets.token_bytes(16)  # fingerprints of credentials live in memory only
        self._verified: dict[str, set[str]] = {}  # repo key -> fingerprints that proved access
        self._refs: dict[tuple[str, str], tuple[str, float]] = {}  # (repo key, branch) -> (commit, monotonic)
        self._tasks: dict[str, asyncio.Task[WorkspaceInfo]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._boot_id = _boot_id()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for d in (self.root, self.root / "mirrors", self.root / "locks"):
            d.mkdir(mode=0o700, exist_ok=True)
        self._records = WorkspaceRecords(self._m.settings.data_dir / "state.db")
        db = self._db
        for name in await asyncio.to_thread(sshauth.sweep_stale):  # a key file a killed daemon left
            log.warning("removed the ssh key directory %s of a daemon that stopped during a fetch", name)
        for p in (self.root / "mirrors").iterdir():  # a first fetch interrupted by a crash
            if p.name.startswith(".tmp-"):
                await asyncio.to_thread(shutil.rmtree, p, True)
            else:
                Mirror(self.root / "mirrors", p.name.removesuffix(".git")).repair()
        for layer in db.layers():
            gone = any(not self._m.layer_path(x).exists() for x in (layer.layer_id, *layer.chain))
            if gone or (not layer.durable and layer.boot_id != self._boot_id):  # may be incomplete after an OS crash
                db.delete_layer(layer.layer_id)
                self._m.unpin_layers(f"git:{layer.layer_id}")
            elif not layer.durable:
                self._spawn(self._make_durable(layer.layer_id))
        for ws in db.all():
            if ws.status is WorkspaceStatus.CREATING:
                err = {"code": "internal", "message": "the daemon stopped during its creation"}
                db.update(replace(ws, status=WorkspaceStatus.ERROR, error=err))

    async def aclose(self) -> None:
        for t in list(self._tasks.values()):
            t.cancel()
        tasks = [*self._tasks.values(), *self._background]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._records is not None:
            self._records.close()

    async def wait_background(self) -> None:
        """Wait for background work (history fetches, eviction, durability flushes) started so far."""
        while pending := [t for t in self._background if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def _db(self) -> WorkspaceRecords:
        if self._records is None:
            raise BranchboxError(
                "the workspace service is not started: add it to its Manager before that starts "
                "(workspaces = manager.add_service(WorkspaceService(manager)); async with manager: ...)"
            )
        return self._records

    # ------------------------------------------------------------------ commands
    async def create(
        self,
        repository_url: str,
        *,
        branch: str | None = None,
        commit: str | None = None,
        template: str = "default",
        depth: int | None = None,
        path: str | None = None,
        token: str | None = None,
        ssh_key: str | None = None,
        known_hosts: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> WorkspaceInfo:
        """A workspace: a sandbox with ``repository_url`` checked out at ``branch`` or ``commit`` under ``path``
        (default ``/workspace/<repository name>``). ``wait=False`` returns at once with status ``creating``.

        ``depth``: depth of the first fetch when the cache has never seen the repository (default 1; its history
        follows in the background). ``token``: credentials for an http(s) server (or put them in the URL); used
        for git processes only, never stored. ``ssh_key`` (and ``known_hosts``, the server's host keys): for an ssh
        repository; a file for each git process only, never stored (workspaces/sshauth.py)."""
        known_file = self.settings.ssh_known_hosts
        repo = replace(parse_repo_url(repository_url, token), allow_cidrs=self.settings.allow_cidrs,
                       ssh_known_hosts=str(known_file) if known_file is not None else None)  # fmt: skip
        repo = with_ssh_auth(repo, ssh_key, known_hosts)
        if branch is not None and commit is not None:
            raise BadRequestError("give either branch or commit, not both")
        br = check_branch(branch) if branch is not None else None
        cm = check_commit(commit) if commit is not None else None
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH):
            raise BadRequestError(f"depth must be an integer from 1 to {MAX_DEPTH}, got {depth!r}")
        where = check_sandbox_path(path or f"/workspace/{repo.name}")
        self._m.templates.get(template)
        if br is None and cm is None:  # like `git clone` without --branch: the server's default branch
            t, fp = self.settings.git_timeout, repo.fingerprint(self._salt)
            br = await self._flight.do(("head", repo.key, fp), lambda: default_branch(repo, timeout=t))
        ws = WorkspaceInfo(id=new_workspace_id(), status=WorkspaceStatus.CREATING, repository_url=repo.url,
                           branch=br, commit=cm, path=where, template=template, created_at=time.time())  # fmt: skip
        self._db.insert(ws)
        task = asyncio.get_running_loop().create_task(
            self._create(ws, repo, depth or self.settings.default_depth, timeout, metadata, env)
        )
        self._tasks[ws.id] = task
        wid = ws.id
        task.add_done_callback(lambda _t: self._tasks.pop(wid, None) and None)
        if not wait:
            task.add_done_callback(_consume)  # errors live in the record
            return ws
        try:
            return await asyncio.shield(task)
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self._db.delete(ws.id)  # the caller got the error: no record stays behind
            raise

    async def get(self, workspace_id: str) -> WorkspaceInfo:
        ws = self._db.get(workspace_id)
        if ws is None:
            raise WorkspaceNotFoundError(f"workspace {workspace_id!r} does not exist (it may have been deleted)")
        return ws

    async def list(self) -> list[WorkspaceInfo]:
        return self._db.all()

    async def delete(self, workspace_id: str) -> None:
        """Destroy the workspace's sandbox and forget the workspace (the cached commit layer stays)."""
        ws = await self.get(workspace_id)
        task = self._tasks.get(workspace_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            ws = self._db.get(workspace_id) or ws
        if ws.sandbox_id is not None:
            with contextlib.suppress(SandboxNotFoundError):
                await self._m.destroy(ws.sandbox_id)
        self._db.delete(workspace_id)

    # ------------------------------------------------------------------ the request path
    async def _create(self, ws: WorkspaceInfo, repo: RepoUrl, depth: int, timeout: float | None,
                      metadata: Mapping[str, str] | None, env: Mapping[str, str] | None) -> WorkspaceInfo:  # fmt: skip
        timer = PhaseTimer()
        try:
            layer, commit, cached = await self._layer(ws, repo, depth, timer)
            ws = replace(ws, commit=commit, cached=cached)
            with timer.phase("sandbox"):
                meta = {"workspace": ws.id, **(metadata or {})}
                chain = [layer.layer_id, *layer.chain]
                sbx = await self._m.create_on_layers(chain, template=ws.template, timeout=timeout, metadata=meta,
                                                     env=env, warm=True, warm_up=["git", "-C", ws.path, "status",
                                                     "--porcelain"])  # fmt: skip
        except asyncio.CancelledError:
            raise
        except BranchboxError as exc:
            ws = replace(ws, status=WorkspaceStatus.ERROR, timings=timer.as_dict(),
                         error={"code": exc.code, "message": exc.message})  # fmt: skip
            self._db.update(ws)
            log.info("workspace %s failed: %s", ws.id, exc.message)
            raise
        except Exception as exc:
            ws = replace(ws, status=WorkspaceStatus.ERROR, timings=timer.as_dict(),
                         error={"code": "internal", "message": repo.redact(repr(exc))})  # fmt: skip
            self._db.update(ws)
            raise GitError(f"workspace {ws.id} failed: {repo.redact(repr(exc))}") from exc
        timings = {**timer.as_dict(), **{f"sandbox.{k}": v for k, v in sbx.timings.items() if k != "total"}}
        ws = replace(ws, status=WorkspaceStatus.READY, sandbox_id=sbx.id, timings=timings)
        self._db.update(ws)
        log.info("workspace %s ready: %s@%s in %.1f ms (cached=%s)", ws.id, ws.repository_url,
                 (ws.commit or "")[:12], timer.total_ms, ws.cached)  # fmt: skip
        return ws

    async def _layer(
        self, ws: WorkspaceInfo, repo: RepoUrl, depth: int, timer: PhaseTimer
    ) -> tuple[CommitLayer, str, bool]:
        """The commit layer for the request: found (fast path) or built under the repository's lock."""
        db = self._db
        t = self.settings.git_timeout
        commit = ws.commit
        mirror = Mirror(self.root / "mirrors", repo.key)
        fp = repo.fingerprint(self._salt)
        verified = self._verified.setdefault(repo.key, set())
        known = mirror.exists()  # a repository the cache lacks is resolved (and access proven) by its first fetch
        if ws.branch is not None and known:
            with timer.phase("resolve"):
                commit = await self._resolve_branch(repo, ws.branch)
        elif ws.branch is None and known and fp not in verified:
            with timer.phase("resolve"):  # these credentials never proved access to this repository
                await self._flight.do(("access", repo.key, fp), lambda: check_access(repo, timeout=t))
                verified.add(fp)
        if commit is not None and fp in verified:
            layer = db.find_layer(repo.key, commit, ws.branch, ws.path)
            if layer is not None:
                db.touch_layer(layer.layer_id)
                return layer, layer.commit_id, True
        async with self._locks.hold(repo.key):
            full = await self._ensure_commit(mirror, repo, commit, ws.branch, depth, timer)
            verified.add(fp)
            layer = db.find_layer(repo.key, full, ws.branch, ws.path)
            cached = layer is not None
            if layer is None:
                layer = await self._build(mirror, repo, full, ws.branch, ws.path, timer)
        db.touch_layer(layer.layer_id)
        return layer, full, cached

    async def _resolve_branch(self, repo: RepoUrl, branch: str) -> str:
        ttl = self.settings.ref_ttl
        cached = self._refs.get((repo.key, branch))
        fp = repo.fingerprint(self._salt)
        if (
            ttl > 0
            and cached is not None
            and time.monotonic() - cached[1] < ttl
            and fp in self._verified.get(repo.key, set())
        ):
            return cached[0]
        sha = await self._flight.do(("ls", repo.key, branch, fp),
                                    lambda: ls_remote(repo, branch, timeout=self.settings.git_timeout))  # fmt: skip
        self._verified.setdefault(repo.key, set()).add(fp)
        self._refs[(repo.key, branch)] = (sha, time.monotonic())
        return sha

    async def _ensure_commit(self, mirror: Mirror, repo: RepoUrl, commit: str | None, branch: str | None,
                             depth: int, timer: PhaseTimer) -> str:  # fmt: skip
        """The mirror has ``commit`` when this returns (its full id). Fetches only what is missing.

        ``commit`` None: the tip of ``branch`` of a repository the cache lacked a moment ago (fetched now, or just
        now by a concurrent request)."""
        t = self.settings.git_timeout
        if not mirror.exists():
            with timer.phase("fetch"):
                await mirror.create(repo, branch=branch, commit=None if branch else commit, depth=depth, timeout=t)
            self._db.touch_mirror(repo.key, repo.url)
            self._spawn(self._deepen(mirror, repo))
        if commit is None:
            assert branch is not None
            tip = await mirror.branch_commit(branch)
            if tip is not None:
                return tip
            commit = await self._resolve_branch(repo, branch)  # the mirror came without it: ask the server
        full = await mirror.resolve(commit)
        if full is not None:
            return full
        try:
            with timer.phase("fetch"):
                if branch is not None:
                    await mirror.fetch_branch(repo, branch, timeout=t)
                else:
                    await mirror.fetch_commit(repo, commit, timeout=t)
            self._db.touch_mirror(repo.key, repo.url)
        except BaseException:
            await asyncio.to_thread(mirror.repair)
            raise
        full = await mirror.resolve(commit)
        if full is None and branch is not None:  # the branch moved again (force push) since we asked: use its tip
            full = await mirror.branch_commit(branch)
        if full is None:
            raise RefNotFoundError(f"commit {commit} does not exist in {repo.url}")
        return full

    async def _build(self, mirror: Mirror, repo: RepoUrl, commit: str, branch: str | None, path: str,
                     timer: PhaseTimer) -> CommitLayer:  # fmt: skip
        driver = self._m.storage_driver
        lid = new_layer_id()
        dest = self._m.layer_path(lid)
        base = await self._diff_base(mirror, repo, commit, branch, path)
        staging, tree = await asyncio.to_thread(layer_fs.staging_dir, driver, dest)
        try:
            with timer.phase("checkout"):
                if base is not None:
                    lowers = [self._m.lower_path(x) for x in (base.layer_id, *base.chain)]
                    await build_diff(mirror, repo, base.commit_id, commit, branch, lowers, tree, path,
                                     self._m.settings.idmap, timeout=self.settings.git_timeout)  # fmt: skip
                else:
                    await build_checkout(mirror, repo, commit, branch, tree, path, self._m.settings.idmap,
                                         timeout=self.settings.git_timeout)  # fmt: skip
            with timer.phase("layer"):
                await asyncio.to_thread(layer_fs.seal, driver, staging, dest)
                chain = (base.layer_id, *base.chain) if base is not None else ()
                layer = CommitLayer(lid, repo.key, commit, branch or "", path, time.time(), None, self._boot_id, False,
                                    chain)  # fmt: skip
                self._m.add_pinned_layer(lid, f"git:{lid}", below=chain)
                self._db.add_layer(layer)
        except BaseException:
            await asyncio.to_thread(layer_fs.discard, driver, staging)
            await asyncio.to_thread(mirror.repair)  # a lazy blob fetch may have been cut off
            raise
        self._spawn(self._make_durable(lid))
        return layer

    async def _diff_base(self, mirror: Mirror, repo: RepoUrl, commit: str, branch: str | None,
                         path: str) -> CommitLayer | None:  # fmt: skip
        """A recent layer of the same repository, branch and path that ``commit`` differs from in few files."""
        if self._m.storage_driver != "overlay":  # btrfs: a full checkout is a subvolume of its own anyway
            return None
        shallow = mirror.shallow
        for cand in self._db.recent_layers(repo.key, branch, path):
            if len(cand.chain) + 1 >= MAX_DIFF_CHAIN or cand.commit_id == commit:
                continue
            lowers = [self._m.lower_path(x) for x in (cand.layer_id, *cand.chain)]
            if any(not p.is_dir() or ":" in str(p) or "," in str(p) for p in lowers):
                continue
            had_shallow = any((p / path.lstrip("/") / ".git" / "shallow").exists() for p in lowers)
            if shallow and not had_shallow:  # a re-fetched (shallow) mirror under a full history: start over
                continue
            if await mirror.resolve(cand.commit_id) is None:
                continue
            changed = await mirror.changed_paths(cand.commit_id, commit, limit=MAX_DIFF_FILES)
            if changed is not None:
                return cand
        return None

    # ------------------------------------------------------------------ background work
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _deepen(self, mirror: Mirror, repo: RepoUrl) -> None:
        try:
            async with self._locks.hold(repo.key):
                if mirror.exists():
                    await mirror.deepen(repo, timeout=self.settings.git_timeout)
                    self._db.touch_mirror(repo.key, repo.url)
        except Exception as exc:  # the mirror stays shallow; the next first-fetch-like request retries nothing
            log.warning("fetching the history of %s failed: %s", repo.url, repo.redact(str(exc)))
            with contextlib.suppress(OSError):
                await asyncio.to_thread(mirror.repair)

    async def _make_durable(self, layer_id: str) -> None:
        path = self._m.layer_path(layer_id)
        try:
            await asyncio.to_thread(syncfs, path)
            usage = await asyncio.to_thread(disk_usage, path)
        except OSError:
            return
        if self._records is not None:
            self._db.set_layer(layer_id, durable=1, size_bytes=usage.size_bytes)
            await self._evict()

    async def _evict(self) -> None:
        """Keep mirrors + commit layers under ``cache_budget_mb``: drop the least recently used first (a layer
        in use by a sandbox goes when that sandbox does; the newest layer is never evicted)."""
        db = self._db
        budget = self.settings.cache_budget_mb * 1024 * 1024
        mirrors = db.mirrors()
        for key, _, size in mirrors:
            if size is None:
                p = Mirror(self.root / "mirrors", key).path
                with contextlib.suppress(OSError):
                    db.set_mirror_size(key, (await asyncio.to_thread(disk_usage, p)).size_bytes or 0)
        items: list[tuple[float, str, str, int]] = [(lu, "mirror", k, s or 0) for k, lu, s in db.mirrors()]
        items += [(x.last_used, "layer", x.layer_id, x.size_bytes or 0) for x in db.layers()]
        total = sum(i[3] for i in items)
        items.sort()
        newest = max((i for i in items if i[1] == "layer"), default=None)
        for last_used, kind, ident, size in items:
            if total <= budget:
                break
            if newest is not None and ident == newest[2]:
                continue
            total -= size
            if kind == "layer":
                log.info("evicting commit layer %s (last used %.0f s ago)", ident, time.time() - last_used)
                db.delete_layer(ident)
                self._m.drop_spares(ident)
                self._m.unpin_layers(f"git:{ident}")
            else:
                log.info("evicting mirror %s", ident)
                async with self._locks.hold(ident):
                    db.delete_mirror(ident)
                    await asyncio.to_thread(shutil.rmtree, Mirror(self.root / "mirrors", ident).path, True)
