"""Test networks: unique NetworkSettings per test and a fake "internet" in a namespace of the test's own.

The namespace is held by a process (``unshare --net sleep``), never named (``ip netns add`` would add a mount to
the host that other tests count), and reached through ``/proc/PID/ns/net``. It is routed from the host over a
veth and holds two "public" web servers (203.0.113.x, documentation addresses), one "private" one (172.31.x.1)
and the DNS server the daemon's forwarder uses as upstream. Every name and address is unique per test, so
parallel workers never collide. Nothing here sends traffic anywhere but loopback and these namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from branchbox.net.settings import NetworkSettings

REPO = str(Path(__file__).resolve().parent.parent)


def _worker() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name[2:].isdigit() else 0


def _taken(k: int) -> bool:
    """Whether another test (of any worker) uses the addresses of ``k`` right now."""
    link = f"198.51.100.{4 * k + 1}"
    return bool(sh("ip", "-o", "addr", "show", "to", link).strip() or sh("ip", "route", "show", f"203.0.113.{k + 1}"))


def sh(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False, timeout=60)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


@dataclass
class Internet:
    """The fake internet of one test."""

    k: int
    tag: str
    pid: int = 0
    holder: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[str] | None = None

    @property
    def link_host(self) -> str:
        return f"198.51.100.{4 * self.k + 1}"

    @property
    def link_ns(self) -> str:
        return f"198.51.100.{4 * self.k + 2}"

    @property
    def public_a(self) -> str:
        return f"203.0.113.{self.k + 1}"

    @property
    def public_b(self) -> str:
        return f"203.0.113.{self.k + 65}"

    @property
    def private(self) -> str:
        return f"172.31.{self.k}.1"

    @property
    def host_if(self) -> str:
        return f"{self.tag}i"

    @property
    def zone(self) -> dict[str, str]:
        return {
            "a.example.test": self.public_a,
            "b.example.test": self.public_b,
            "www.b.example.test": self.public_b,
            "private.example.test": self.private,
        }

    @property
    def dns(self) -> str:
        return f"{self.public_a}:53"

    def routes(self) -> list[str]:
        return [f"{self.public_a}/32", f"{self.public_b}/32", f"{self.private}/32"]

    def start(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
        self.pid = self.holder.pid
        ns = f"--net=/proc/{self.pid}/ns/net"
        # wait until unshare has made the new namespace (the holder's netns differs from ours)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --net did not make a namespace in 10 s")
            os.sched_yield()
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", str(self.pid))
        sh("ip", "addr", "add", f"{self.link_host}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        inner = (
            f"addr add {self.link_ns}/30 dev eth0\nlink set eth0 up\nlink set lo up\n"
            + "".join(f"addr add {a}/32 dev lo\n" for a in (self.public_a, self.public_b, self.private))
            + f"route add default via {self.link_host}\n"
        )
        sh("nsenter", ns, "ip", "-batch", "-", stdin=inner)
        for r in self.routes():
            sh("ip", "route", "add", r, "via", self.link_ns)
        env = {**os.environ, "PYTHONPATH": REPO}
        self.server = subprocess.Popen(
            [
                "nsenter",
                ns,
                sys.executable,
                "-m",
                "tests.net_internet",
                self.public_a,
                *(f"{k}={v}" for k, v in self.zone.items()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the test internet did not start: {line!r}")

    def stop(self) -> None:
        for proc in (self.server, self.holder):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.server is not None:
            for pipe in (self.server.stdin, self.server.stdout):
                if pipe is not None:
                    pipe.close()
        # our routes and link address go with our interface (never delete by address: it may be another test's)
        sh("ip", "link", "del", self.host_if, check=False)  # usually gone with the namespace already


def make_internet() -> Internet:
    """A started test internet on addresses no other test uses (parallel workers race: retried on a clash)."""
    for _ in range(50):
        k = secrets.randbelow(64)
        if _taken(k):
            continue
        inet = Internet(k=k, tag="bt" + secrets.token_hex(3))
        try:
            inet.start()
        except RuntimeError as exc:
            inet.stop()
            if "File exists" in str(exc):
                continue  # another worker took k between the check and our start
            raise
        return inet
    raise RuntimeError("no free test internet addresses (64 in use?)")


def network_settings(internet: Internet | None, **overrides: object) -> NetworkSettings:
    token = secrets.token_hex(3)
    block = ipaddress.ip_network(f"10.{160 + _worker() % 64}.{16 * secrets.randbelow(16)}.0/20")
    kw: dict[str, object] = {
        "subnet": str(block),
        "table": f"bbt{token}",
        "if_prefix": f"t{token[:5]}",
        "dns_upstream": internet.dns if internet is not None else "127.0.0.1:9",
        "dns_timeout": 2.0,
    }
    kw.update(overrides)
    return NetworkSettings(**kw)  # type: ignore[arg-type]


def host_network_state(settings: NetworkSettings) -> dict[str, object]:
    """What a daemon's networking left on the host: its veths, its table, routes and addresses in its subnet."""
    prefix = settings.if_prefix + "-"
    ifaces = sorted(n for n in os.listdir("/sys/class/net") if n.startswith(prefix))
    tables = [t for t in sh("nft", "list", "tables").split() if t == settings.table]
    routes = [line for line in sh("ip", "route", "show", "root", settings.subnet).splitlines() if line.strip()]
    addrs = [line for line in sh("ip", "-o", "addr", "show").splitlines() if _in(line, settings.subnet)]
    return {"ifaces": ifaces, "tables": tables, "routes": routes, "addrs": addrs}


def _in(line: str, subnet: str) -> bool:
    net = ipaddress.ip_network(subnet)
    for word in line.split():
        if "/" in word:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_interface(word).ip in net:
                    return True
    return False
