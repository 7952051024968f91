"""Where the host's git may connect: the remote's addresses are resolved here, checked against the blocked ranges
sandboxes have (private, link-local/metadata, loopback... ``branchbox.net.BLOCKED_V4``, their IPv6 equivalents,
and every address of this host), and the one address checked is pinned for the git process, so a DNS answer that
changes between the check and git's own lookup (DNS rebinding) changes nothing:

* http(s): ``http.curloptResolve`` (curl's ``--resolve``: TLS still checks the certificate for the name), and
  ``http.followRedirects=false`` (a redirect would name a host nobody checked);
* git://: ``url.<address>.insteadOf`` (the remote's URL, rewritten for this process only);
* ssh: ``-o HostName=<address>`` with ``HostKeyAlias=<name>``.

``WorkspaceSettings.allow_cidrs`` (config ``git_allow_cidrs``) names ranges that are allowed anyway (an internal
git server). Without it a workspace request cannot make the daemon's host connect to its own network.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import shlex
import socket
from collections.abc import Sequence

from branchbox.errors import RepositoryUnreachableError, RepositoryUrlError
from branchbox.net.policy import BLOCKED_V4, BLOCKED_V6

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_BLOCKED = tuple(ipaddress.ip_network(n) for n in (*BLOCKED_V4, *BLOCKED_V6, "::/128", "64:ff9b::/96"))
_DEFAULT_PORTS = {"https": 443, "http": 80, "git": 9418, "ssh": 22}


def _local(addr: Address) -> bool:
    """Whether ``addr`` is one of this host's own addresses (binding to it works)."""
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((str(addr), 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL  # e.g. EACCES: assume the worst
    return True


def blocked(addr: Address, allow: tuple[str, ...]) -> str | None:
    """Why ``addr`` may not be connected to (None: it may)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    allowed = []
    for cidr in allow:
        with contextlib.suppress(ValueError):
            allowed.append(ipaddress.ip_network(cidr, strict=False))
    if any(addr.version == n.version and addr in n for n in allowed):
        return None
    for net in _BLOCKED:
        if addr.version == net.version and addr in net:
            return f"in the blocked range {net}"
    if _local(addr):
        return "an address of the daemon's own host"
    return None


async def resolve(host: str, port: int, allow: tuple[str, ...]) -> Address:
    """The address to connect to for ``host``: every address it resolves to must be allowed."""
    try:
        literal: Address | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        addrs = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise RepositoryUnreachableError(f"cannot resolve the git server {host!r}: {exc}") from exc
        addrs = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
    for addr in addrs:
        why = blocked(addr, allow)
        if why is not None:
            raise RepositoryUrlError(
                f"the git server {host!r} resolves to {addr}, {why}: the daemon does not fetch from there; "
                "an operator may allow the range with git_allow_cidrs (BRANCHBOX_GIT_ALLOW_CIDRS)",
                host=host,
            )
    if not addrs:
        raise RepositoryUnreachableError(f"the git server {host!r} has no address")
    return addrs[0]


async def pinned_config(
    scheme: str, host: str, port: int | None, netloc: str, allow: tuple[str, ...]
) -> list[tuple[str, str]]:
    """git config entries that make one git process connect to the checked address of ``host`` only."""
    real_port = port or _DEFAULT_PORTS.get(scheme, 443)
    addr = await resolve(host, real_port, allow)
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    if scheme in ("http", "https"):
        return [("http.curloptResolve", f"{host}:{real_port}:{addr}"), ("http.followRedirects", "false")]
    if scheme == "git":
        return [(f"url.git://{shown}:{real_port}/.insteadOf", f"git://{netloc}/")]
    return []  # ssh: see ssh_command


def ssh_command(
    host: str | None = None,
    addr: str | None = None,
    *,
    port: int | None = None,
    identity: str | None = None,
    known_hosts: Sequence[str] = (),
) -> str:
    """The ssh git runs: none of the host's configuration, keys, agent or known hosts; pinned to ``addr``.

    ``identity``: the only key offered (a file of the request's key, workspaces/sshauth.py); ``known_hosts``: files
    of the only host keys trusted (the operator's, the request's), checked strictly (none: the server's key is not
    checked). The host key is looked up as ``host`` (``[host]:port`` off port 22: what ``ssh-keyscan -p PORT host``
    prints), not as ``addr``."""
    files = [known_hosts] if isinstance(known_hosts, str) else list(known_hosts)  # a str is a Sequence too
    argv = [
        "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", f"IdentityFile={identity or 'none'}", "-o", "IdentityAgent=none", "-o", "CertificateFile=none",
        "-o", "PreferredAuthentications=publickey", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"UserKnownHostsFile={' '.join(files) or '/dev/null'}",
        "-o", f"StrictHostKeyChecking={'yes' if files else 'accept-new'}", "-o", "UpdateHostKeys=no",
        "-o", "ProxyCommand=none", "-o", "ProxyJump=none", "-o", "PermitLocalCommand=no", "-o", "ForwardAgent=no",
    ]  # fmt: skip
    if host is not None and addr is not None:
        alias = host if port in (None, 22) else f"[{host}]:{port}"
        argv += ["-o", f"HostName={addr}", "-o", f"HostKeyAlias={alias}"]
    return " ".join(shlex.quote(a) for a in argv)  # git runs it through the shell
