"""Repository URLs: validation, the credential-free form, the cache key, and credentials for one git process.

Credentials come from the URL's userinfo (``https://user:token@host/repo.git``) or a separate token. They are
turned into an ``Authorization`` header that reaches git only through its environment
(``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n``: not on a command line other users can read),
and are never written to a mirror's config, the store, logs or API responses. An ssh repository's key (the
request's ``ssh_key``) rides along as :class:`SshAuth` and becomes a file for one git process only (sshauth.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import branchbox.workspaces.egress as git_egress
from branchbox.errors import BadRequestError, RepositoryUrlError
from branchbox.workspaces.sshauth import SshAuth, auth_files, ssh_auth

ALLOWED_SCHEMES = ("https", "http", "git", "ssh")
DEFAULT_TOKEN_USER = "x-access-token"  # noqa: S105 - a user name sent with a bare token (GitHub, Gitea accept it)
_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/].*)$")
_BRANCH_BAD = re.compile(r"(^[-/.])|(\.\.)|(@\{)|([\x00-\x20\x7f~^:?*\[\\])|(/$)|(\.lock$)|(\.$)|(//)")
_COMMIT = re.compile(r"^[0-9a-f]{4,64}$")


@dataclass(frozen=True, slots=True)
class RepoUrl:
    """A validated repository URL split into its public part and its secret part."""

    url: str  # credential-free: what mirrors, records, logs and responses hold
    key: str  # cache key: hash of the normalized credential-free URL
    name: str  # the repository's name (last path component without .git)
    auth_header: str | None = field(default=None, repr=False)  # "Authorization: Basic ..." for git only
    scheme: str = "https"
    host: str = ""
    port: int | None = None
    netloc: str = ""  # as in ``url`` (git:// URLs are rewritten to the checked address by this prefix)
    allow_cidrs: tuple[str, ...] = ()  # blocked ranges the operator allows anyway (workspaces/egress.py)
    ssh: SshAuth | None = field(default=None, repr=False)  # the request's ssh key (workspaces/sshauth.py)
    ssh_known_hosts: str | None = None  # the operator's known_hosts file (checked strictly with the request's)

    def git_config(self) -> list[tuple[str, str]]:
        """git config entries that give one git process the credentials (empty without credentials)."""
        return [] if self.auth_header is None else [("http.extraHeader", self.auth_header)]

    @contextlib.asynccontextmanager
    async def git_env(self) -> AsyncIterator[dict[str, str]]:
        """Environment entries for one git process that reaches this repository, valid inside the block: its
        credentials, and the checked, pinned address of its server (raises when that is in a blocked range:
        workspaces/egress.py). An ssh key exists as a file only inside the block (workspaces/sshauth.py)."""
        pairs = self.git_config()
        pairs += await git_egress.pinned_config(self.scheme, self.host, self.port, self.netloc, self.allow_cidrs)
        env = {"GIT_CONFIG_COUNT": str(len(pairs))}
        for i, (key, value) in enumerate(pairs):
            env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
        if self.scheme != "ssh":
            yield env
            return
        addr = str(await git_egress.resolve(self.host, self.port or 22, self.allow_cidrs))
        trusted = [self.ssh_known_hosts] if self.ssh_known_hosts else []
        if self.ssh is None:
            env["GIT_SSH_COMMAND"] = git_egress.ssh_command(self.host, addr, port=self.port, known_hosts=trusted)
            yield env
            return
        with auth_files(self.ssh) as (key_file, known):
            env["GIT_SSH_COMMAND"] = git_egress.ssh_command(
                self.host, addr, port=self.port, identity=str(key_file) if key_file else None,
                known_hosts=[*trusted, str(known)] if known else trusted,
            )  # fmt: skip
            yield env

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never appear in a message (the header and its base64 payload, an ssh key's lines)."""
        out = list(self.ssh.secrets) if self.ssh is not None else []
        if self.auth_header is None:
            return tuple(out)
        payload = self.auth_header.split(" ", 2)[-1]
        out += [self.auth_header, payload]
        try:
            user_pass = base64.b64decode(payload).decode()
            out += [p for p in user_pass.split(":", 1) if len(p) >= 4]
        except ValueError:
            pass
        return tuple(out)

    def fingerprint(self, salt: bytes) -> str:
        """A salted hash of the credentials (or of their absence): which callers proved access to this repo."""
        key = self.ssh.key if self.ssh is not None else ""
        return hashlib.sha256(salt + (self.auth_header or "").encode() + b"\0" + key.encode()).hexdigest()

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text


def parse_repo_url(raw: str, token: str | None = None) -> RepoUrl:
    """Validate ``raw`` (https, http, git, ssh or scp-like ``user@host:path``); split off its credentials.

    Local paths, ``file://`` and other transports are refused: a request must not read the host's files."""
    if not isinstance(raw, str) or not raw or len(raw) > 2048 or any(c.isspace() or ord(c) < 32 for c in raw):
        raise RepositoryUrlError("repository_url must be a URL like https://host/owner/repo.git (no spaces)")
    user: str | None = None
    password: str | None = None
    m = _SCP_LIKE.match(raw) if "://" not in raw else None
    port: int | None = None
    netloc = ""
    if m is not None:
        clean = f"{m['user'] + '@' if m['user'] else ''}{m['host']}:{m['path']}"
        scheme, host, path = "ssh", m["host"].lower(), m["path"]
    else:
        try:
            parts = urllib.parse.urlsplit(raw)
            port = parts.port
        except ValueError as exc:
            raise RepositoryUrlError(f"repository_url is not a valid URL: {exc}") from exc
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise RepositoryUrlError(
                f"repository_url scheme {parts.scheme or '(none)'!r} is not allowed: use one of "
                + ", ".join(ALLOWED_SCHEMES)
                + " (local paths and file:// are refused)"
            )
        host = (parts.hostname or "").lower()
        if not host:
            raise RepositoryUrlError("repository_url has no host: use e.g. https://host/owner/repo.git")
        path = parts.path
        if not path.strip("/"):
            raise RepositoryUrlError("repository_url has no repository path: use e.g. https://host/owner/repo.git")
        if parts.query or parts.fragment:
            raise RepositoryUrlError("repository_url must not have a query or fragment")
        if scheme in ("http", "https"):
            user = urllib.parse.unquote(parts.username) if parts.username else None
            password = urllib.parse.unquote(parts.password) if parts.password is not None else None
            netloc = host if port is None else f"{host}:{port}"
        else:  # ssh keeps its user name (it is not a secret); git:// has none
            netloc = (f"{parts.username}@" if scheme == "ssh" and parts.username else "") + (
                host if port is None else f"{host}:{port}"
            )
            if parts.password is not None:
                raise RepositoryUrlError("passwords in ssh:// URLs are not supported: use a key or https with a token")
        clean = urllib.parse.urlunsplit((scheme, netloc, path, "", ""))
    if token is not None and (not isinstance(token, str) or not token or any(c.isspace() for c in token)):
        raise BadRequestError("the git token must be a non-empty string without spaces")
    secret = token if token is not None else password
    header = None
    if secret is not None or user is not None:
        if scheme not in ("http", "https"):
            raise RepositoryUrlError("credentials are only supported for http(s) repository URLs")
        cred = f"{user or DEFAULT_TOKEN_USER}:{secret or ''}"
        header = "Authorization: Basic " + base64.b64encode(cred.encode()).decode()
    if host.startswith("-") or (m is not None and (m["user"] or "").startswith("-")) or path.startswith("-"):
        raise RepositoryUrlError("repository_url must not have a host, user or path starting with '-'")
    norm = f"{scheme}://{host}/{path.strip('/').removesuffix('.git')}"
    key = hashlib.sha256(norm.encode()).hexdigest()[:32]
    name = path.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].removesuffix(".git") or "repo"
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name) or name in (".", ".."):
        name = "repo"
    return RepoUrl(url=clean, key=key, name=name, auth_header=header, scheme=scheme, host=host, port=port,
                   netloc=netloc)  # fmt: skip


def with_ssh_auth(repo: RepoUrl, ssh_key: str | None, known_hosts: str | None) -> RepoUrl:
    """``repo`` with the request's ssh key and known hosts, checked (workspaces/sshauth.py); they are only for
    ssh repositories (``ssh://`` or ``user@host:path``)."""
    auth = ssh_auth(ssh_key, known_hosts)
    if auth is None:
        return repo
    if repo.scheme != "ssh":
        raise BadRequestError(
            "ssh_key and known_hosts are only used for ssh repositories (ssh://user@host/path or user@host:path): "
            f"this one is {repo.scheme}://; use token for http(s)"
        )
    return replace(repo, ssh=auth)


def check_branch(branch: str) -> str:
    """A branch name git accepts (``git check-ref-format --branch`` rules, checked without a subprocess)."""
    if not isinstance(branch, str) or not branch or len(branch) > 255 or _BRANCH_BAD.search(branch):
        raise BadRequestError(f"branch {branch!r} is not a valid git branch name")
    return branch.removeprefix("refs/heads/")


def check_commit(commit: str) -> str:
    """A (possibly abbreviated, at least 4 digits) hexadecimal commit id, lowercased."""
    c = commit.lower() if isinstance(commit, str) else ""
    if not _COMMIT.match(c):
        raise BadRequestError(f"commit {commit!r} is not a hexadecimal commit id")
    return c


def check_sandbox_path(path: str) -> str:
    """An absolute, normalized path inside the sandbox for the checkout (not / and not in system dirs)."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024:
        raise BadRequestError(f"path {path!r} must be an absolute path such as /workspace/repo")
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._@+-]{1,255}", p) for p in parts):
        raise BadRequestError(f"path {path!r} must be a normalized absolute path of plain names")
    if parts[0] in ("proc", "sys", "dev", "tmp", "run", "etc", "bin", "sbin", "lib", "lib64", "usr", "var"):
        raise BadRequestError(f"path {path!r} is in a system directory: use e.g. /workspace/<name> or /root/<name>")
    return "/" + "/".join(parts)
