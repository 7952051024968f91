"""Running git on the host: a hermetic environment, credentials through the environment only, and failures
translated into typed errors (``raise ... from`` at the boundary) with credentials redacted."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from branchbox.errors import (
    BranchboxError,
    GitError,
    RefNotFoundError,
    RepositoryAuthError,
    RepositoryNotFoundError,
    RepositoryUnreachableError,
)
from branchbox.workspaces.egress import ssh_command
from branchbox.workspaces.urls import RepoUrl

GIT = "git"
_UNREACHABLE = (
    "could not resolve host", "connection refused", "unable to connect", "failed to connect", "unable to look up",
    "no route to host", "connection timed out", "network is unreachable", "couldn't connect", "timed out",
    "name or service not known",
)  # fmt: skip
_DIED = (
    "early eof", "remote end hung up", "unexpected disconnect", "invalid index-pack output", "protocol error",
    "bad pack header", "index-pack failed", "rpc failed", "transfer closed", "connection reset",
    "fetch-pack: unable to", "expected flush", "unexpected end of file", "premature end", "the remote hung up",
    "curl 18", "curl 56", "gnutls", "broken pipe",
)  # fmt: skip
_AUTH = ("authentication failed", "terminal prompts disabled", "could not read username", "could not read password",
         "http basic: access denied", "permission denied", "returned error: 403", "returned error: 401")  # fmt: skip
_HOST_KEY = ("host key verification failed", "remote host identification has changed",
             "no matching host key type", "host key for ")  # fmt: skip
_NO_REPO = ("repository not found", "does not appear to be a git repository", "returned error: 404",
            "no such repository", "access denied", "not exported", "not found")  # fmt: skip
_NO_REF = ("couldn't find remote ref", "not our ref", "no such remote ref", "unadvertised object",
           "invalid refspec", "no matching remote head")  # fmt: skip


@dataclass(frozen=True, slots=True)
class GitResult:
    returncode: int
    stdout: bytes
    stderr: str


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A hermetic environment: no system/global config, no prompts, only network transports."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "true",
        "SSH_ASKPASS": "true",
        "GIT_SSH_COMMAND": ssh_command(),  # none of the host's ssh config, keys or agent (workspaces/egress.py)
        "GIT_ALLOW_PROTOCOL": "http:https:git:ssh",
        "GIT_PROTOCOL_FROM_USER": "0",
        "GIT_AUTHOR_NAME": "branchbox",
        "GIT_AUTHOR_EMAIL": "branchbox@localhost",
        "GIT_COMMITTER_NAME": "branchbox",
        "GIT_COMMITTER_EMAIL": "branchbox@localhost",
    }
    if extra:
        env.update(extra)
    return env


async def run_git(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    repo: RepoUrl | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 600.0,
    check: bool = True,
    what: str = "git",
) -> GitResult:
    """Run ``git args``; with ``repo``, its credentials reach this process only. ``check``: raise a typed
    error on a non-zero exit (the message names ``what`` and the redacted tail of git's stderr)."""
    async with contextlib.AsyncExitStack() as stack:
        full_env = base_env(env)
        if repo is not None:  # credentials, the server's checked address pinned, an ssh key's files (this block)
            full_env.update(await stack.enter_async_context(repo.git_env()))
        proc = await asyncio.create_subprocess_exec(
            GIT, *args, cwd=cwd, env=full_env,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
    text = err.decode(errors="replace")
    if repo is not None:
        text = repo.redact(text)
    res = GitResult(proc.returncode or 0, out, text)
    if check and res.returncode != 0:
        raise classify(res, what=what, url=repo.url if repo is not None else None)
    return res


def classify(res: GitResult, *, what: str, url: str | None) -> BranchboxError:
    """The most specific error for a failed git command, from its (C-locale) stderr."""
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    tail = "; ".join(lines[-3:])[:600] or f"exit status {res.returncode}"
    low = res.stderr.lower()
    where = f" {url}" if url else ""
    if any(s in low for s in _DIED):
        return RepositoryUnreachableError(
            f"{what}: the git server{where} closed the connection during the transfer ({tail}); "
            "the cache was left as it was before: retry"
        )
    if any(s in low for s in _UNREACHABLE):
        return RepositoryUnreachableError(f"{what}: cannot reach the git server{where} ({tail}): check the URL")
    if any(s in low for s in (*_HOST_KEY, *_AUTH)):
        return _auth_error(low, what=what, where=where, tail=tail, ssh=url is not None and _is_ssh(url))
    if any(s in low for s in _NO_REF):
        return RefNotFoundError(f"{what}: {tail}")
    if any(s in low for s in _NO_REPO):
        return RepositoryNotFoundError(f"{what}: there is no repository at{where} ({tail})")
    return GitError(f"{what} failed: {tail}")


def _is_ssh(url: str) -> bool:
    return url.startswith("ssh://") or "://" not in url


def _auth_error(low: str, *, what: str, where: str, tail: str, ssh: bool) -> RepositoryAuthError:
    if any(s in low for s in _HOST_KEY):
        return RepositoryAuthError(
            f"{what}: the ssh server{where} did not show a host key listed in known_hosts ({tail}): pass its "
            "keys in known_hosts (what `ssh-keyscan -p PORT HOST` prints, checked out of band)"
        )
    hint = "pass an ssh_key the server accepts (with read access)" if ssh else "pass a token with read access"
    return RepositoryAuthError(f"{what}: the git server{where} refused the credentials ({tail}): {hint}")
