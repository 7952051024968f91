"""One bare mirror per repository under ``DATA/git/mirrors/<key>.git``.

Fetch policy (docs/workspaces.md):

* A repository the cache has never seen is fetched **shallow** (``--depth``, default 1, all blobs of that
  commit): the first request costs about one ``git clone --depth=1``. Its history (commits and trees, no blobs:
  ``--filter=blob:none --unshallow``) follows in the background (:meth:`Mirror.deepen`).
* After that the mirror is a partial clone: later fetches bring commits and trees; the blobs a checkout needs
  are fetched lazily by git in one batch (``read-tree -u``), so a new commit of a known repository costs only
  the changed blobs.
* A mirror is created in a temporary directory and renamed into place after its first fetch succeeded, so a
  failed first fetch leaves nothing. A failed later fetch leaves the mirror as it was (git writes the pack to a
  temporary file and moves refs only after the pack is complete); :meth:`Mirror.repair` removes the temporary
  files such a failure can leave.

Callers hold the repository's lock (``locks.RepoLocks``) around every call that writes.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from pathlib import Path

from branchbox.errors import RefNotFoundError
from branchbox.workspaces.gitcmd import classify, run_git
from branchbox.workspaces.urls import RepoUrl

_MIRROR_CONFIG = {
    "core.logAllRefUpdates": "false",
    "gc.auto": "0",  # never repack behind our back: layers hard-link the mirror's packs
    "transfer.unpackLimit": "1",  # keep every fetch as a pack (layers link packs, not thousands of loose files)
    "fetch.writeCommitGraph": "false",
    "remote.origin.fetch": "+refs/heads/*:refs/heads/*",
}


def config_text(values: dict[str, str]) -> str:
    """git config file text for ``{"section.key" or "section.sub.key": value}`` (values quoted and escaped)."""
    sections: dict[str, list[str]] = {}
    for k, v in values.items():
        section, _, name = k.rpartition(".")
        first, _, sub = section.partition(".")
        head = f'[{first} "{sub}"]' if sub else f"[{first}]"
        quoted = v.replace("\\", "\\\\").replace('"', '\\"')
        sections.setdefault(head, []).append(f'\t{name} = "{quoted}"')
    return "".join(f"{head}\n" + "\n".join(lines) + "\n" for head, lines in sections.items())


def _append_config(path: Path, values: dict[str, str]) -> None:
    with open(path, "a") as f:
        f.write(config_text(values))


async def ls_remote(repo: RepoUrl, branch: str, *, timeout: float) -> str:
    """The commit ``branch`` points at on the server (asks the server; raises RefNotFoundError if absent)."""
    res = await run_git(["ls-remote", "--", repo.url, f"refs/heads/{branch}"], repo=repo, timeout=timeout,
                        what=f"looking up branch {branch!r}")  # fmt: skip
    for line in res.stdout.decode(errors="replace").splitlines():
        sha, _, ref = line.partition("\t")
        if ref == f"refs/heads/{branch}":
            return sha
    raise RefNotFoundError(f"branch {branch!r} does not exist in {repo.url}: check the name (case matters)")


async def default_branch(repo: RepoUrl, *, timeout: float) -> str:
    """The branch the server's HEAD points at (what ``git clone`` checks out without ``--branch``)."""
    res = await run_git(["ls-remote", "--symref", "--", repo.url, "HEAD"], repo=repo, timeout=timeout,
                        what="looking up the default branch")  # fmt: skip
    for line in res.stdout.decode(errors="replace").splitlines():
        if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
            return line[len("ref: refs/heads/") : -len("\tHEAD")]
    raise RefNotFoundError(f"{repo.url} has no default branch (an empty repository?): pass branch or commit")


async def check_access(repo: RepoUrl, *, timeout: float) -> None:
    """Prove the caller may read the repository (one cheap ref listing)."""
    await run_git(["ls-remote", "--", repo.url, "HEAD"], repo=repo, timeout=timeout, what="checking access")


class Mirror:
    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        self.path = root / f"{key}.git"

    def exists(self) -> bool:
        return (self.path / "HEAD").is_file()

    @property
    def shallow(self) -> bool:
        return (self.path / "shallow").exists()

    @property
    def partial(self) -> bool:
        return any(p.suffix == ".promisor" for p in (self.path / "objects" / "pack").iterdir())

    async def create(self, repo: RepoUrl, *, branch: str | None, commit: str | None, depth: int,
                     timeout: float) -> None:  # fmt: skip
        """First fetch of a repository: shallow, into a temporary dir that becomes the mirror on success."""
        tmp = self.root / f".tmp-{self.path.name}-{secrets.token_hex(4)}"
        try:
            await run_git(["init", "-q", "--bare", str(tmp)], what="creating the mirror")
            await self._configure(tmp, repo)
            if branch is not None:
                await run_git(["fetch", "-q", "--no-tags", f"--depth={depth}", "origin",
                               f"+refs/heads/{branch}:refs/heads/{branch}"], cwd=tmp, repo=repo, timeout=timeout,
                              what=f"fetching branch {branch!r}")  # fmt: skip
            else:
                assert commit is not None
                await self._fetch_commit(tmp, repo, commit, depth=depth, timeout=timeout)
            await asyncio.to_thread(os.rename, tmp, self.path)
        finally:
            if tmp.exists():
                await asyncio.to_thread(shutil.rmtree, tmp, True)

    @staticmethod
    async def _configure(path: Path, repo: RepoUrl) -> None:
        """Append our settings to the config ``git init`` wrote (one file write instead of a git per key)."""
        _append_config(path / "config", {"remote.origin.url": repo.url, **_MIRROR_CONFIG})

    async def fetch_branch(self, repo: RepoUrl, branch: str, *, timeout: float) -> None:
        await run_git(["fetch", "-q", "--no-tags", "origin", f"+refs/heads/{branch}:refs/heads/{branch}"],
                      cwd=self.path, repo=repo, timeout=timeout, what=f"fetching branch {branch!r}")  # fmt: skip

    async def fetch_commit(self, repo: RepoUrl, commit: str, *, timeout: float) -> None:
        await self._fetch_commit(self.path, repo, commit, depth=None, timeout=timeout)

    async def _fetch_commit(self, path: Path, repo: RepoUrl, commit: str, *, depth: int | None,
                            timeout: float) -> None:  # fmt: skip
        """Fetch one commit by id; servers that refuse unadvertised objects get a fetch of all branches."""
        args = ["fetch", "-q", "--no-tags", *([f"--depth={depth}"] if depth else []), "origin"]
        if len(commit) in (40, 64):
            res = await run_git([*args, commit], cwd=path, repo=repo, timeout=timeout, check=False)
            if res.returncode == 0:
                return
            if "not our ref" not in res.stderr and "unadvertised" not in res.stderr:
                raise classify(res, what=f"fetching commit {commit}", url=repo.url)
        filt = [] if depth else ["--filter=blob:none"]
        await run_git(["fetch", "-q", "--no-tags", *filt, "origin", "+refs/heads/*:refs/heads/*"], cwd=path,
                      repo=repo, timeout=timeout, what="fetching all branches")  # fmt: skip
        if await self._resolve(path, commit) is None:
            raise RefNotFoundError(f"commit {commit} does not exist in {repo.url} (not on any branch)")

    async def resolve(self, commit: str) -> str | None:
        """The full id of ``commit`` if the mirror has that commit, else None."""
        return await self._resolve(self.path, commit)

    @staticmethod
    async def _resolve(path: Path, commit: str) -> str | None:
        # not rev-parse/cat-file: in a partial clone they fetch a missing object from the server, one by one;
        # rev-list with --missing=print never does
        res = await run_git(["rev-list", "--missing=print", "--no-walk", f"{commit}^{{commit}}", "--"], cwd=path,
                            check=False)  # fmt: skip
        if res.returncode != 0:
            return None
        return res.stdout.decode().strip() or None

    async def changed_paths(self, base: str, commit: str, *, limit: int) -> int | None:
        """How many paths differ between two commits (trees only: no blob is fetched); None above ``limit``."""
        res = await run_git(["diff-tree", "-r", "--no-renames", "--name-only", "-z", base, commit], cwd=self.path,
                            check=False)  # fmt: skip
        if res.returncode != 0:
            return None
        n = res.stdout.count(b"\0")
        return n if n <= limit else None

    async def branch_commit(self, branch: str) -> str | None:
        return await self._resolve(self.path, f"refs/heads/{branch}")

    async def deepen(self, repo: RepoUrl, *, timeout: float) -> None:
        """Fetch the history of every branch without blobs; the mirror becomes a partial, unshallow clone."""
        args = ["fetch", "-q", "--no-tags", "--filter=blob:none"]
        if self.shallow:
            args.append("--unshallow")
        await run_git([*args, "origin", "+refs/heads/*:refs/heads/*"], cwd=self.path, repo=repo, timeout=timeout,
                      what="fetching the history")  # fmt: skip

    def repair(self) -> None:
        """Remove what an interrupted fetch can leave (temporary packs and object files, stale lock files)."""
        objects = self.path / "objects"
        for d in (objects, objects / "pack"):
            if d.is_dir():
                for p in d.iterdir():
                    if p.name.startswith(("tmp_", "incoming-")) or p.name.endswith(".lock"):
                        if p.is_dir():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.unlink(missing_ok=True)
        for name in ("shallow.lock", "packed-refs.lock", "config.lock", "FETCH_HEAD"):
            (self.path / name).unlink(missing_ok=True)
        refs = self.path / "refs"
        if refs.is_dir():
            for p in refs.rglob("*.lock"):
                p.unlink(missing_ok=True)
