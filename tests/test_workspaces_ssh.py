"""Workspaces from ssh repositories with a key given in the request, against a real OpenSSH server (Debian's
openssh-server, started by the test on a loopback port with its own host key and config, serving a bare repository
through git-shell). The key reaches ssh as a file for one git process only; nothing keeps it; the host's own keys,
agent and known hosts are never used; blocked addresses are refused before any connection."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from branchbox import errors, sdk
from branchbox.daemon.config import ConfigError, load_config
from branchbox.workspaces.egress import ssh_command
from branchbox.workspaces.sshauth import MAX_SSH_KEY_CHARS, check_known_hosts, check_ssh_key
from tests.conftest import SRC, TEST_ROOT, DaemonProc, free_port
from tests.test_cli import bb

SSHD = "/usr/sbin/sshd"


def _keygen(path: Path, passphrase: str = "") -> str:
    """A new ed25519 key at ``path``; returns its SHA256 fingerprint as sshd logs it."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)],
                   check=True)  # fmt: skip
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


@dataclass
class SshGitServer:
    """sshd on 127.0.0.1:<port>, its own host key and config; every login runs git-shell (git over ssh only).
    ``key``: a key it accepts (the one requests give); ``host_owned``: another key it accepts, which tests place
    where the host's own ssh would look (an agent, root's ~/.ssh); ``stranger``: a key it does not accept."""

    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def repo(self) -> Path:
        return self.root / "srv" / "proj.git"

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{self.repo}"

    def key_text(self, name: str) -> str:
        return (self.root / name).read_text()

    @property
    def known_hosts(self) -> str:
        """The server's host key as ``ssh-keyscan -p PORT 127.0.0.1`` prints it."""
        return f"[127.0.0.1]:{self.port} " + " ".join((self.root / "host_key.pub").read_text().split()[:2]) + "\n"

    @property
    def log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")

    def accepted(self) -> list[str]:
        """Fingerprints of the keys the server accepted so far (from its log)."""
        return re.findall(r"Accepted publickey for root from \S+ port \d+ ssh2: \S+ (SHA256:\S+)", self.log)

    def start(self) -> SshGitServer:
        if not os.access(SSHD, os.X_OK):
            raise RuntimeError(f"{SSHD} is missing: `make test-apt` installs Debian's openssh-server")
        self.root.mkdir(mode=0o700, parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / "host_key")], check=True)
        for name in ("key", "host_owned", "stranger"):
            self.fingerprints[name] = _keygen(self.root / name)
        accepted = [(self.root / f"{n}.pub").read_text() for n in ("key", "host_owned")]
        (self.root / "authorized_keys").write_text("".join(accepted))
        work = self.root / "work"
        work.mkdir()
        _git("init", "-q", "-b", "main", str(work))
        (work / "README").write_text("served over ssh\n")
        _git("add", "README", cwd=work)
        _git("commit", "-q", "-m", "first", cwd=work)
        self.repo.parent.mkdir()
        _git("clone", "-q", "--bare", str(work), str(self.repo))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir (its package's)
        self.port = free_port()
        conf = self.root / "sshd_config"
        conf.write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.root}/host_key
PidFile none
AuthorizedKeysFile {self.root}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers root
AllowTcpForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
LogLevel VERBOSE
ForceCommand /usr/bin/git-shell -c "$SSH_ORIGINAL_COMMAND"
""")
        with open(self.root / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while "Server listening" not in self.log:  # a separate process: its log is the only readiness signal
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start:\n{self.log}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def sshd() -> Iterator[SshGitServer]:
    server = SshGitServer(TEST_ROOT / f"sshd-{secrets.token_hex(4)}")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def agent(sshd: SshGitServer) -> Iterator[str]:
    """An ssh-agent holding a key the server accepts: the socket a host user's ssh would use."""
    sock = sshd.root / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(sshd.root / "host_owned")], env=env, check=True)
        listed = subprocess.run(["ssh-add", "-l"], env=env, capture_output=True, text=True, check=True).stdout
        assert sshd.fingerprints["host_owned"] in listed  # the agent offers it to any ssh that asks
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait()


def _body_lines(key: str) -> list[str]:
    return [ln for ln in key.splitlines() if len(ln) >= 16 and not ln.startswith("-----")]


def _files_holding(root: Path, needles: list[str]) -> list[str]:
    found = []
    raw = [n.encode() for n in needles]
    for p in root.rglob("*"):
        if p.is_symlink() or not p.is_file():
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if any(n in data for n in raw):
            found.append(str(p))
    return found


@pytest.mark.root
@pytest.mark.template
def test_ssh_key_through_the_sdk_and_cli(daemon_factory: Any, sshd: SshGitServer, agent: str, tmp_path: Path) -> None:
    """The user's path: SDK and CLI against a real daemon, a real sshd; the key works, is used for that request
    only and kept nowhere; no key, a wrong key or a wrong host key fail with clear errors without key material."""
    scratch = tmp_path / "scratch"  # the daemon's TMPDIR: where a key's per-process directory goes
    scratch.mkdir(mode=0o700)
    # what a daemon killed during a fetch left (named for its pid, gone now), and a live daemon's directory
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, live = scratch / f"branchbox-ssh-{gone.pid}-x1", scratch / f"branchbox-ssh-{os.getpid()}-x2"
    for leftover in (stale, live):
        leftover.mkdir(mode=0o700)
        (leftover / "id").write_text("a key\n")
    d: DaemonProc = daemon_factory(env={"TMPDIR": str(scratch), "SSH_AUTH_SOCK": agent})
    assert os.listdir(scratch) == [live.name]  # the dead one's is removed at start, the live one's is not
    shutil.rmtree(live)
    assert "removed the ssh key directory" in d.log()
    key, other = sshd.key_text("key"), sshd.key_text("stranger")
    needles = _body_lines(key)
    url = sshd.url

    def no_key_material(text: str) -> None:
        assert not any(n in text for n in needles), "a key line appears in a message"

    # the right key, host key checked strictly
    with sdk.Workspace.create(url, branch="main", ssh_key=key, known_hosts=sshd.known_hosts, base_url=d.url) as ws:
        assert ws.info.status == "ready" and ws.info.repository_url == url and len(ws.commit or "") == 40
        res = ws.sandbox.commands.run("cat README && git status --porcelain && git remote get-url origin",
                                      cwd=ws.path)  # fmt: skip
        assert res.stdout == f"served over ssh\n{url}\n"
        no_key_material(json.dumps(ws.info.__repr__()))
        commit = ws.commit
    assert set(sshd.accepted()) == {sshd.fingerprints["key"]}

    # without known_hosts the host key is not checked (documented). This request builds a layer for another
    # branch under the repository's lock, so the history fetch the first request started (in the background,
    # with the same key, under that lock) has finished when it returns
    _git("--git-dir", str(sshd.repo), "update-ref", "refs/heads/other", "main")
    with sdk.Workspace.create(url, branch="other", ssh_key=key, base_url=d.url) as ws2:
        assert ws2.commit == commit and not ws2.info.cached
    assert os.listdir(scratch) == []  # every key's directory is gone
    assert "fetching the history" not in d.log()  # it did not fail

    # the CLI reads the key from a file and sends it
    (tmp_path / "id").write_text(key)
    (tmp_path / "kh").write_text(sshd.known_hosts)
    made = bb("workspace", "create", url, "--branch", "main", "--ssh-key-file", str(tmp_path / "id"),
              "--known-hosts-file", str(tmp_path / "kh"), "--json", url=d.url)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["status"] == "ready"
    no_key_material(made.stdout + made.stderr)
    assert bb("workspace", "rm", json.loads(made.stdout)["workspace_id"], url=d.url).returncode == 0

    # no key (the daemon's agent holds a key the server accepts: ssh must not use it), a wrong key: the
    # server refuses, also for the branch and the commit the cache holds
    for kwargs in ({"branch": "main"}, {"commit": commit}, {"branch": "main", "ssh_key": other},
                   {"commit": commit, "ssh_key": other}):  # fmt: skip
        with pytest.raises(sdk.PermissionDeniedError) as denied:
            sdk.Workspace.create(url, base_url=d.url, **kwargs)  # type: ignore[arg-type]
        assert denied.value.code == "repository_auth_failed" and "ssh_key" in denied.value.message, kwargs
        no_key_material(denied.value.message)
    # a host key other than the server's
    wrong_hosts = f"[127.0.0.1]:{sshd.port} " + " ".join(sshd.key_text("stranger.pub").split()[:2]) + "\n"
    with pytest.raises(sdk.PermissionDeniedError) as hk:
        sdk.Workspace.create(url, branch="main", ssh_key=key, known_hosts=wrong_hosts, base_url=d.url)
    assert hk.value.code == "repository_auth_failed" and "known_hosts" in hk.value.message
    no_key_material(hk.value.message)
    assert set(sshd.accepted()) == {sshd.fingerprints["key"]}  # never the agent's key, never the stranger

    # bad input: a clear 400 with a stable code, nothing echoed
    encrypted_path = tmp_path / "locked"
    _keygen(encrypted_path, passphrase="correct horse")
    bad_keys = {
        "public": (sshd.key_text("key.pub"), "public key"),
        "garbage": ("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key at all\n-----END OPENSSH PRIVATE KEY-----\n",
                    "not a valid OpenSSH private key"),
        "encrypted": (encrypted_path.read_text(), "passphrase"),
        "truncated": (key[: len(key) // 2], "not an unencrypted ssh private key"),
    }  # fmt: skip
    for name, (text, says) in bad_keys.items():
        with pytest.raises(sdk.BadRequestError) as bad:
            sdk.Workspace.create(url, branch="main", ssh_key=text, base_url=d.url)
        assert bad.value.code == "invalid_ssh_key" and says in bad.value.message, name
        no_key_material(bad.value.message)
        assert not any(ln in bad.value.message for ln in _body_lines(text)), name
    with httpx.Client(base_url=d.url, timeout=60) as c:
        big = c.post("/v1/workspaces", json={"repository_url": url, "ssh_key": key + "A" * MAX_SSH_KEY_CHARS})
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        no_key_material(big.text)
        https = c.post("/v1/workspaces", json={"repository_url": "https://example.com/o/r.git", "ssh_key": key})
        assert https.status_code == 400 and "only used for ssh repositories" in https.json()["error"]["message"]
        hosts = c.post("/v1/workspaces", json={"repository_url": url, "ssh_key": key, "known_hosts": "garbage"})
        assert hosts.status_code == 400 and "known_hosts line 1" in hosts.json()["error"]["message"]
        # blocked addresses are refused before any connection, with or without a key
        for bad_url in ("git@169.254.169.254:org/repo.git", "ssh://git@10.1.2.3/org/repo.git",
                        "ssh://git@[fd00::1]:2222/org/repo.git"):  # fmt: skip
            r = c.post("/v1/workspaces", json={"repository_url": bad_url, "branch": "main", "ssh_key": key})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_repository_url", r.text
            assert "blocked range" in r.json()["error"]["message"]
            no_key_material(r.text)
        listed = c.get("/v1/workspaces").text
        no_key_material(listed)

    # nothing kept: no per-process directory left, no key line in the data dir (state.db, mirrors, layers,
    # sandboxes, the daemon's own log)
    assert os.listdir(scratch) == []
    assert _files_holding(d.data_dir, needles) == []
    assert (d.data_dir / "state.db").exists() and (d.data_dir / "daemon.log").exists()


@pytest.mark.root
@pytest.mark.template
def test_operator_known_hosts_checks_every_ssh_fetch(daemon_factory: Any, sshd: SshGitServer, tmp_path: Path) -> None:
    """git_ssh_known_hosts (BRANCHBOX_GIT_SSH_KNOWN_HOSTS): every ssh fetch checks the host key strictly against
    the operator's file (and a request's own known_hosts), read at each fetch."""
    trusted = tmp_path / "ssh_known_hosts"
    trusted.write_text(sshd.known_hosts)
    d: DaemonProc = daemon_factory(env={"BRANCHBOX_GIT_SSH_KNOWN_HOSTS": str(trusted)})
    key = sshd.key_text("key")
    with sdk.Workspace.create(sshd.url, branch="main", ssh_key=key, base_url=d.url) as ws:  # listed: verified
        assert ws.info.status == "ready"
    impostor = f"[127.0.0.1]:{sshd.port} " + " ".join(sshd.key_text("stranger.pub").split()[:2]) + "\n"
    trusted.write_text(impostor)  # the operator's list names another key for this server
    with pytest.raises(sdk.PermissionDeniedError) as changed:
        sdk.Workspace.create(sshd.url, branch="main", ssh_key=key, base_url=d.url)
    assert changed.value.code == "repository_auth_failed" and "known_hosts" in changed.value.message
    trusted.write_text("# nothing trusted\n")  # a server the list does not name: no longer accepted unchecked
    with pytest.raises(sdk.PermissionDeniedError) as unknown:
        sdk.Workspace.create(sshd.url, branch="main", ssh_key=key, base_url=d.url)
    assert "known_hosts" in unknown.value.message
    # the request's own known_hosts is trusted next to the operator's
    with sdk.Workspace.create(sshd.url, branch="main", ssh_key=key, known_hosts=sshd.known_hosts, base_url=d.url) as w2:
        assert w2.info.status == "ready"


def test_operator_known_hosts_config(tmp_path: Path) -> None:
    good = tmp_path / "kh"
    good.write_text(
        "git.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
    )
    cfg = load_config(env={"BRANCHBOX_GIT_SSH_KNOWN_HOSTS": str(good)})
    assert cfg.manager_settings().workspaces.ssh_known_hosts == good
    assert load_config(env={}).manager_settings().workspaces.ssh_known_hosts is None
    bad = tmp_path / "bad"
    bad.write_text("not a known_hosts line\n")
    spaced = tmp_path / "a b"
    spaced.write_text(good.read_text())
    for path, says in ((bad, "line 1"), (tmp_path / "missing", "cannot read"), (spaced, "without spaces")):
        with pytest.raises(ConfigError, match=says):
            load_config(env={"BRANCHBOX_GIT_SSH_KNOWN_HOSTS": str(path)}).manager_settings()


@pytest.mark.root
def test_ssh_never_uses_roots_own_keys(sshd: SshGitServer) -> None:
    """root's ~/.ssh (ssh finds it through the password database, not $HOME: here a private mount namespace shows
    an /etc/passwd whose root home is the test's own) holds a key the server accepts, a config naming it and the
    server's host key. Plain ssh logs in with it (the control); the daemon's git, given
    no key, does not: the fetch is refused and the server saw no login."""
    script = r"""
set -e
H="$SRV/roothome"
mkdir -m 0700 "$H" "$H/.ssh"
cp "$SRV/host_owned" "$H/.ssh/id_ed25519"
printf 'Host *\n  IdentityFile ~/.ssh/id_ed25519\n  StrictHostKeyChecking no\n' > "$H/.ssh/config"
echo "$KNOWN" > "$H/.ssh/known_hosts"
chmod 600 "$H"/.ssh/*
awk -F: -v OFS=: -v h="$H" '$3 == 0 { $6 = h } { print }' /etc/passwd > "$SRV/passwd"
mount --bind "$SRV/passwd" /etc/passwd
GIT_SSH_COMMAND=ssh git ls-remote "$URL" refs/heads/main | cut -c1-40 > "$SRV/control"
exec "$PY" -c "$CODE"
"""
    code = r"""
import asyncio, dataclasses, os, sys
from branchbox import errors
from branchbox.workspaces import mirror, urls
repo = dataclasses.replace(urls.parse_repo_url(os.environ["URL"]), allow_cidrs=("127.0.0.0/8",))
try:
    asyncio.run(mirror.ls_remote(repo, "main", timeout=60))
except errors.RepositoryAuthError as exc:
    print("refused:", exc.message)
    sys.exit(0)
print("fetched with the host's key")
sys.exit(3)
"""
    env = {**os.environ, "SRV": str(sshd.root), "URL": sshd.url, "KNOWN": sshd.known_hosts.strip(),
           "PY": sys.executable, "CODE": code, "PYTHONPATH": SRC}  # fmt: skip
    env.pop("SSH_AUTH_SOCK", None)
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=env,
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "refused:" in res.stdout and "ssh_key" in res.stdout
    assert len((sshd.root / "control").read_text().strip()) == 40  # root's key works for plain ssh
    assert sshd.accepted() == [sshd.fingerprints["host_owned"]]  # the control's login only


def _openssh_key(cipher: bytes) -> str:
    """The text of an OpenSSH-format key file whose header names ``cipher`` (the rest is filler)."""
    raw = b"openssh-key-v1\x00" + len(cipher).to_bytes(4, "big") + cipher + b"\x00" * 40
    body = base64.b64encode(raw).decode()
    lines = [body[i : i + 70] for i in range(0, len(body), 70)]
    return "-----BEGIN OPENSSH PRIVATE KEY-----\r\n" + "\r\n".join(lines) + "\r\n-----END OPENSSH PRIVATE KEY-----"


def test_request_key_checks_and_ssh_options() -> None:
    """Pure checks: what a key must look like (CRLF and a missing final newline are repaired: ssh needs the
    newline); the ssh command offers only the given key and trusts only the given host keys (``ssh -G`` prints
    the configuration ssh would use)."""
    plain = check_ssh_key(_openssh_key(b"none"))
    assert plain.endswith("-----END OPENSSH PRIVATE KEY-----\n") and "\r" not in plain
    with pytest.raises(errors.InvalidSshKeyError, match="passphrase"):
        check_ssh_key(_openssh_key(b"aes256-ctr"))
    with pytest.raises(errors.InvalidSshKeyError, match="at most"):
        check_ssh_key(_openssh_key(b"none") + "\n" * MAX_SSH_KEY_CHARS)
    pem = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAAAAAAAAAAAAAAAAAA\n"
    with pytest.raises(errors.InvalidSshKeyError, match="passphrase"):
        check_ssh_key(pem + "-----END RSA PRIVATE KEY-----\n")
    assert check_known_hosts("# c\r\n[h]:2222 ssh-ed25519 AAAAC3Nza==\n") == "# c\n[h]:2222 ssh-ed25519 AAAAC3Nza==\n"
    with pytest.raises(errors.BadRequestError, match="line 2"):
        check_known_hosts("h ssh-ed25519 AAAA\nh ssh-ed25519 not/base64!\n")
    command = ssh_command("git.example.test", "203.0.113.9", port=2222, identity="/dev/shm/k/id",
                          known_hosts="/dev/shm/k/known_hosts")  # fmt: skip
    argv = shlex.split(command)  # git runs it through the shell
    out = subprocess.run([*argv, "-G", "git.example.test"], capture_output=True, text=True, check=True).stdout
    conf: dict[str, list[str]] = {}
    for line in out.splitlines():
        k, _, v = line.partition(" ")
        conf.setdefault(k, []).append(v)
    assert conf["identityfile"] == ["/dev/shm/k/id"] and conf["identityagent"] == ["none"]
    assert conf["userknownhostsfile"] == ["/dev/shm/k/known_hosts"] and conf["globalknownhostsfile"] == ["/dev/null"]
    assert conf["stricthostkeychecking"] == ["true"] and conf["hostkeyalias"] == ["[git.example.test]:2222"]
    assert conf["hostname"] == ["203.0.113.9"] and conf["identitiesonly"] == ["yes"]
    assert conf["preferredauthentications"] == ["publickey"] and "proxycommand" not in conf
