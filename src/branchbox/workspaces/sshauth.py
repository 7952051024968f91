"""ssh keys given with a workspace request (docs/workspaces.md, "ssh keys").

A request may carry an ssh private key (``ssh_key``) and the server's host keys (``known_hosts``, the lines
``ssh-keyscan`` prints). They are checked here (bounded, the shape of an unencrypted private key), kept in memory
for the operations of that request only (its fetches, including the background history fetch), and reach ssh
through files that exist for one git process: a fresh 0700 directory (on a memory filesystem when the host has
``/dev/shm``) holding the key (0600) and the known hosts, removed when the process ends, also when it failed;
what a daemon killed meanwhile left behind is removed when a daemon starts (:func:`sweep_stale`). Nothing is
stored in the data dir, the store, logs, errors or the workspace's record.

Host keys: with ``known_hosts`` ssh checks strictly (``StrictHostKeyChecking=yes``, that file and the operator's
``WorkspaceSettings.ssh_known_hosts`` only); with the operator's file alone, against it. Without either the
server's host key is not checked (``accept-new`` against an empty list): the connection is encrypted and the
key cannot be replayed by an impostor (public-key authentication signs this session only), but an impostor on the
path could serve other code. Never the host's own ``~/.ssh/known_hosts`` or ``/etc/ssh/ssh_known_hosts``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from branchbox.errors import BadRequestError, InvalidSshKeyError

MAX_SSH_KEY_CHARS = 16 * 1024  # an RSA 16384-bit key in OpenSSH format is ~13 KiB
MAX_KNOWN_HOSTS_CHARS = 64 * 1024
_PEM = re.compile(
    r"-----BEGIN (?P<kind>(?:OPENSSH |RSA |EC |DSA )?)PRIVATE KEY-----\n"
    r"(?P<body>[A-Za-z0-9+/=\n:, -]{16,}?)\n"
    r"-----END (?P=kind)PRIVATE KEY-----\n?"
)
_OPENSSH_MAGIC = b"openssh-key-v1\x00"
_PREFIX = "branchbox-ssh-"  # + the daemon's pid + "-" + random: one directory per git process
_KNOWN_HOSTS_LINE = re.compile(r"^(@(?:cert-authority|revoked) )?[^\s]+ [A-Za-z0-9@.+-]+ [A-Za-z0-9+/]+=*( .*)?$")


@dataclass(frozen=True, slots=True)
class SshAuth:
    """An ssh private key and (optionally) the host keys to trust, for the git processes of one request."""

    key: str = field(repr=False)
    known_hosts: str | None = field(default=None, repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings of the key that must never appear in a message (the whole key and each line of its body)."""
        if not self.key:
            return ()
        body = [ln for ln in self.key.splitlines() if len(ln) >= 16 and not ln.startswith("-----")]
        return (self.key.strip(), *body)


def _openssh_cipher(body: str) -> bytes | None:
    """The cipher name of an OpenSSH-format key (b"none": not encrypted); None when the body is not one."""
    try:
        raw = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(_OPENSSH_MAGIC) or len(raw) < len(_OPENSSH_MAGIC) + 4:
        return None
    n = int.from_bytes(raw[len(_OPENSSH_MAGIC) : len(_OPENSSH_MAGIC) + 4], "big")
    start = len(_OPENSSH_MAGIC) + 4
    return raw[start : start + n] if n <= 64 and start + n <= len(raw) else None


def check_ssh_key(key: object) -> str:
    """``key`` as ssh reads it (LF line ends, one final newline), or :class:`InvalidSshKeyError` saying what to
    change. The message never quotes the key."""
    if not isinstance(key, str) or not key.strip():
        raise InvalidSshKeyError("ssh_key must be the text of an ssh private key (-----BEGIN OPENSSH PRIVATE KEY-----)")
    if len(key) > MAX_SSH_KEY_CHARS:
        raise InvalidSshKeyError(f"ssh_key is {len(key)} characters long; at most {MAX_SSH_KEY_CHARS} are accepted")
    text = key.replace("\r\n", "\n").strip() + "\n"
    if text.startswith(("ssh-", "ecdsa-", "sk-")):
        raise InvalidSshKeyError("ssh_key is a public key: pass the private key (the file without .pub)")
    m = _PEM.fullmatch(text)
    if m is None:
        raise InvalidSshKeyError(
            "ssh_key is not an unencrypted ssh private key: expected the text of a key file, from "
            "-----BEGIN OPENSSH PRIVATE KEY----- (or RSA, EC, DSA, PKCS#8) to its -----END ... PRIVATE KEY----- line"
        )
    body = m["body"]
    if "ENCRYPTED" in body:  # PEM "Proc-Type: 4,ENCRYPTED"
        raise InvalidSshKeyError("ssh_key is protected by a passphrase: the daemon cannot type it; give a key "
                                 "without one (ssh-keygen -p -N '' -f KEY removes it from a copy)")  # fmt: skip
    if m["kind"] == "OPENSSH ":
        cipher = _openssh_cipher(body)
        if cipher is None:
            raise InvalidSshKeyError("ssh_key's body is not a valid OpenSSH private key (base64 of openssh-key-v1)")
        if cipher != b"none":
            raise InvalidSshKeyError("ssh_key is protected by a passphrase: the daemon cannot type it; give a key "
                                     "without one (ssh-keygen -p -N '' -f KEY removes it from a copy)")  # fmt: skip
    return text


def check_known_hosts(known_hosts: object) -> str:
    """``known_hosts`` as ssh reads it: lines ``HOST KEYTYPE BASE64KEY`` (``ssh-keyscan`` output), comments."""
    if not isinstance(known_hosts, str) or not known_hosts.strip():
        raise BadRequestError("known_hosts must be known_hosts lines such as ssh-keyscan prints them")
    if len(known_hosts) > MAX_KNOWN_HOSTS_CHARS:
        raise BadRequestError(f"known_hosts is {len(known_hosts)} characters long; at most {MAX_KNOWN_HOSTS_CHARS}")
    lines = known_hosts.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if any(ord(c) < 32 and c != "\t" for c in s) or not _KNOWN_HOSTS_LINE.match(" ".join(s.split())):
            raise BadRequestError(
                f"known_hosts line {i} is not 'HOST KEYTYPE BASE64KEY' (such as `ssh-keyscan -p PORT HOST` prints)"
            )
    return "\n".join(ln.strip() for ln in lines).strip() + "\n"


def ssh_auth(ssh_key: str | None, known_hosts: str | None) -> SshAuth | None:
    """The checked request fields (None without a key; ``known_hosts`` alone is valid too: a public repository
    whose server is verified)."""
    if ssh_key is None and known_hosts is None:
        return None
    key = check_ssh_key(ssh_key) if ssh_key is not None else ""
    return SshAuth(key, check_known_hosts(known_hosts) if known_hosts is not None else None)


def _scratch_root() -> str | None:
    """Where the per-process directories go: $TMPDIR if set, else /dev/shm (memory only), else the default."""
    if os.environ.get("TMPDIR"):
        return os.environ["TMPDIR"]
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove the key directories of daemons that died while a git process ran (SIGKILL, a crash): those named
    for a process that no longer exists and owned by this user. Another live daemon's are left alone. Returns
    the names removed."""
    root = Path(_scratch_root() or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for e in entries:
            pid = e.name.removeprefix(_PREFIX).split("-", 1)[0]
            if not e.name.startswith(_PREFIX) or not pid.isdigit() or not e.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if e.stat(follow_symlinks=False).st_uid == os.geteuid() and not _alive(int(pid)):
                    shutil.rmtree(e.path)
                    removed.append(e.name)
    return removed


@contextlib.contextmanager
def auth_files(auth: SshAuth) -> Iterator[tuple[Path | None, Path | None]]:
    """(key file, known hosts file) for one process: in a fresh 0700 directory named for this process (see
    :func:`sweep_stale`), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=_scratch_root()))
    try:
        key = known = None
        if auth.key:
            key = d / "id"
            _write_private(key, auth.key)
        if auth.known_hosts is not None:
            known = d / "known_hosts"
            _write_private(known, auth.known_hosts)
        yield key, known
    finally:
        shutil.rmtree(d, ignore_errors=True)
