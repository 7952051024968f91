"""Build the tree of a commit layer: ``<tree>/<path>`` is a normal git checkout with its own ``.git``.

* Files and the index come from ``git read-tree --reset -u`` run against the mirror (git fetches the blobs the
  commit needs and the mirror lacks in one batch, into the mirror, so the next commit costs only its new blobs).
* ``.git`` is written directly: HEAD, config, packed-refs, ``shallow`` and the mirror's packs, **hard-linked**
  (copied where the layer is on another filesystem or btrfs subvolume). It works inside the sandbox without the
  host's mirror; ``origin`` is the credential-free URL and, for a partial mirror, a promisor remote (git fetches
  missing old blobs from it when the sandbox has network).
* Git settings that keep the first ``git status`` after a copy-on-write copy fast and clean:
  ``core.checkStat=minimal`` (inode, device, uid/gid and sub-second times are not compared: the overlay shows
  other inode/device numbers than the host saw) and ``core.trustctime=false``; and the index's own mtime is set
  after every file's, so no entry is "racily clean" (git would re-read and hash those files).
* Ownership: the tree is chowned to the sandbox's root (``idmap.host_base``) *before* the packs are linked, so
  the mirror's files keep host-root ownership (read-only inside: they show as ``nobody``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import time
from pathlib import Path

from branchbox.backends.base import IdMap
from branchbox.errors import GitError
from branchbox.storage.fsutil import OPAQUE_XATTR
from branchbox.workspaces.gitcmd import GitResult, base_env, classify, run_git
from branchbox.workspaces.mirror import Mirror, config_text
from branchbox.workspaces.urls import RepoUrl


def _mkdirs(root: Path, rel: str) -> Path:
    d = root
    for part in [p for p in rel.split("/") if p]:
        d = d / part
        d.mkdir(mode=0o755, exist_ok=True)
    return d


def workspace_config(url: str, branch: str | None, *, partial: bool) -> str:
    values = {
        "core.repositoryformatversion": "1" if partial else "0",
        "core.filemode": "true",
        "core.bare": "false",
        "core.logallrefupdates": "true",
        "core.checkStat": "minimal",
        "core.trustctime": "false",
        "remote.origin.url": url,
        "remote.origin.fetch": "+refs/heads/*:refs/remotes/origin/*",
    }
    if partial:
        values |= {"remote.origin.promisor": "true", "remote.origin.partialclonefilter": "blob:none",
                   "extensions.partialclone": "origin"}  # fmt: skip
    text = config_text(values)
    if branch is not None:
        sub = branch.replace("\\", "\\\\").replace('"', '\\"')
        text += f'[branch "{sub}"]\n\tremote = origin\n\tmerge = "refs/heads/{sub}"\n'
    return text


async def build_checkout(
    mirror: Mirror, repo: RepoUrl, commit: str, branch: str | None, tree: Path, sandbox_path: str, idmap: IdMap,
    *, timeout: float,
) -> Path:  # fmt: skip
    """Write the checkout of ``commit`` at ``tree/<sandbox_path>``; return that directory."""
    dest = _mkdirs(tree, sandbox_path)
    gitdir = dest / ".git"
    gitdir.mkdir(mode=0o755)
    await run_git(
        # parallel checkout: writing 20k files is bound by filesystem latency more than by CPU here
        ["-c", "checkout.workers=4", "--git-dir", str(mirror.path), "--work-tree", str(dest), "read-tree", "--reset",
         "-u", commit],
        repo=repo, env={"GIT_INDEX_FILE": str(gitdir / "index")}, timeout=timeout,
        what=f"checking out {commit[:12]}",
    )  # fmt: skip
    _write_gitdir(gitdir, mirror, repo.url, commit, branch)
    # opaque: overlay lookups under the checkout never descend into the layers below (the template), which
    # halves the cost of the first `git status` (20 000 lstat on a fresh overlay mount)
    os.setxattr(dest, OPAQUE_XATTR, b"y")
    # the index must be newer than every file it describes, or git re-hashes "racily clean" entries
    newest = time.time() + 2.0
    os.utime(gitdir / "index", (newest, newest))
    await _chown_tree(tree, idmap)
    _link_objects(mirror.path / "objects", gitdir / "objects", idmap)
    return dest


_DIFF_SCRIPT = (
    'mount -t overlay overlay -o "lowerdir=$BB_LOWER,upperdir=$BB_UPPER,workdir=$BB_WORK,userxattr" "$BB_MNT" && '
    'cd "$BB_MNT$BB_PATH" && GIT_INDEX_FILE="$BB_MNT$BB_PATH/.git/index" '
    'git -c core.checkStat=minimal -c core.trustctime=false --git-dir="$BB_MIRROR" --work-tree=. '
    'read-tree -m -u "$BB_BASE" "$BB_NEW"'
)


async def build_diff(
    mirror: Mirror, repo: RepoUrl, base: str, commit: str, branch: str | None, lowers: list[Path], tree: Path,
    sandbox_path: str, idmap: IdMap, *, timeout: float,
) -> Path:  # fmt: skip
    """Write the commit ``commit`` as a layer *above* the layers ``lowers`` holding the checkout of ``base``:
    only the files that differ, whiteouts for deleted ones, and the new .git state (index, HEAD, refs, new
    packs). ``git read-tree -m -u base commit`` runs in an overlay of ``lowers`` + ``tree`` mounted in a
    private mount namespace of its own process (``unshare -m``): the mount cannot outlive it."""
    work = tree.parent / (tree.name + ".work")
    mnt = tree.parent / (tree.name + ".mnt")
    for d in (work, mnt):
        d.mkdir(mode=0o700)
    try:
        env = {
            "BB_LOWER": ":".join(str(p) for p in lowers), "BB_UPPER": str(tree), "BB_WORK": str(work),
            "BB_MNT": str(mnt), "BB_PATH": sandbox_path, "BB_MIRROR": str(mirror.path), "BB_BASE": base,
            "BB_NEW": commit,
        }  # fmt: skip
        async with repo.git_env() as remote:  # a promisor fetch may reach the server: pinned, its key's files
            env.update(remote)
            proc = await asyncio.create_subprocess_exec(
                "unshare", "-m", "--propagation", "private", "--", "sh", "-c", _DIFF_SCRIPT,
                env=base_env(env), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                _, err = await asyncio.wait_for(proc.communicate(), timeout)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
                raise
        if proc.returncode != 0:
            raise classify(GitResult(proc.returncode or 1, b"", repo.redact(err.decode(errors="replace"))),
                           what=f"checking out {commit[:12]} over {base[:12]}", url=repo.url)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mnt, ignore_errors=True)
    dest = tree / sandbox_path.lstrip("/")
    gitdir = dest / ".git"
    _write_gitdir(gitdir, mirror, repo.url, commit, branch, objects=False)
    rel_shallow = Path(sandbox_path.lstrip("/")) / ".git" / "shallow"
    if not mirror.shallow and any((p / rel_shallow).exists() for p in lowers):
        os.mknod(gitdir / "shallow", stat.S_IFCHR | 0o000, 0)  # a whiteout: the history is complete now
    newest = time.time() + 2.0
    os.utime(gitdir / "index", (newest, newest))
    await _chown_tree(tree, idmap)
    have = set()
    for low in lowers:
        pack_dir = low / sandbox_path.lstrip("/") / ".git" / "objects" / "pack"
        if pack_dir.is_dir():
            have.update(os.listdir(pack_dir))
    _link_objects(mirror.path / "objects", gitdir / "objects", idmap, skip=have)
    return dest


def _write_gitdir(
    gitdir: Path, mirror: Mirror, url: str, commit: str, branch: str | None, *, objects: bool = True
) -> None:
    dirs = ["refs/heads", "refs/tags", "refs/remotes/origin", "info", "logs"]
    for d in dirs + (["objects/pack", "objects/info"] if objects else []):
        (gitdir / d).mkdir(parents=True, exist_ok=True)
    (gitdir / "HEAD").write_text(f"ref: refs/heads/{branch}\n" if branch is not None else f"{commit}\n")
    refs = "# pack-refs with: peeled fully-peeled sorted\n"
    if branch is not None:
        refs += f"{commit} refs/heads/{branch}\n{commit} refs/remotes/origin/{branch}\n"
    (gitdir / "packed-refs").write_text(refs)
    (gitdir / "config").write_text(workspace_config(url, branch, partial=mirror.partial))
    (gitdir / "description").write_text("branchbox workspace\n")
    shallow = mirror.path / "shallow"
    if shallow.exists():
        shutil.copyfile(shallow, gitdir / "shallow")


async def _chown_tree(tree: Path, idmap: IdMap) -> None:
    """Everything git wrote is host-root-owned: give it to the sandbox's root (one ``chown -R``, C speed)."""
    owner = f"{idmap.host_base}:{idmap.host_base}"
    proc = await asyncio.create_subprocess_exec(
        "chown", "-R", "-h", owner, str(tree), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise GitError(f"chown of the checkout failed: {err.decode(errors='replace').strip()[:300]}")


def _link_objects(src: Path, dst: Path, idmap: IdMap, *, skip: set[str] | None = None) -> None:
    """Hard-link the mirror's object files into the workspace (copy across filesystems/subvolumes); names in
    ``skip`` (packs the layers below have already) are left out."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dst if rel == "." else dst / rel
        if not target.exists():
            target.mkdir(mode=0o755, parents=True)
            os.chown(target, idmap.host_base, idmap.host_base)
        dirnames[:] = [d for d in dirnames if not d.startswith(("tmp_", "incoming-"))]
        for name in filenames:
            if name.startswith("tmp_") or name.endswith(".lock") or name == "alternates" or (skip and name in skip):
                continue
            s, t = os.path.join(dirpath, name), target / name
            try:
                os.link(s, t)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copy2(s, t)
