"""A daemon's nftables table touches no host traffic that is not its sandboxes' (issue 21: neighbouring daemons).

The table of a daemon killed with SIGKILL stays behind (its sandboxes keep their network until it restarts), and
its DNS forwarder's port is free again: the kernel may give it to any host process as the source port of a
connection, or to a service on loopback. The input chain closed that port on every interface to every packet, so
the RST of a closed port never reached such a client and its ``connect`` hung (the CLI test against
127.0.0.1:9 timed out instead of failing with connection_error). These tests load the daemon's real table (as
``rules.table_script`` writes it) with the forwarder's port set to a port the test holds, and check that loopback
traffic passes while new flows from another interface to that port are still dropped.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator

import pytest

from branchbox.net.nftables import Nft
from branchbox.net.rules import delete_table_script, table_script
from tests.net_env import sh

pytestmark = pytest.mark.root

# a subnet and prefix of no daemon: nothing here matches a sandbox interface
SUBNET = "10.191.240.0/24"
Load = Callable[[int], str]  # loads a daemon table whose forwarder port is the given one


@pytest.fixture
def table_for_port() -> Iterator[Load]:
    """Load a daemon table whose forwarder port is the one given; remove it afterwards."""
    nft = Nft()
    made: list[str] = []

    def load(port: int) -> str:
        name = f"bbtest_rules_{os.getpid()}_{len(made)}"
        made.append(name)
        nft.run(table_script(name, f"zq{os.getpid() % 1000}", SUBNET, port))
        return name

    yield load
    for name in made:
        with contextlib.suppress(Exception):
            nft.run(delete_table_script(name))
    nft.close()


def _closed_port() -> socket.socket:
    """A TCP port that surely refuses: bound (so nobody else takes it) and not listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def test_a_connection_whose_source_port_is_a_dead_forwarders_port_is_refused_not_hung(
    table_for_port: Load,
) -> None:
    closed = _closed_port()
    client = socket.socket()
    client.bind(("127.0.0.1", 0))
    port = client.getsockname()[1]
    table_for_port(port)
    client.settimeout(5)
    try:
        with pytest.raises(ConnectionRefusedError):  # the old rule dropped the RST: TimeoutError after 5 s
            client.connect(closed.getsockname())
    finally:
        client.close()
        closed.close()


def test_a_loopback_service_on_a_dead_forwarders_port_is_reachable(table_for_port: Load) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    table_for_port(server.getsockname()[1])
    try:
        with socket.create_connection(server.getsockname(), timeout=5) as c:
            conn, _ = server.accept()
            conn.sendall(b"hello")
            assert c.recv(5) == b"hello"
            conn.close()
    finally:
        server.close()


def test_the_forwarder_port_stays_closed_to_new_flows_from_another_interface(
    table_for_port: Load,
) -> None:
    ns = f"bbtest-rules-{os.getpid()}"
    host_if, peer_if = f"zqh{os.getpid() % 100000}", f"zqp{os.getpid() % 100000}"
    host_addr, peer_addr = "10.191.241.1", "10.191.241.2"
    forwarder = socket.socket()
    forwarder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    forwarder.bind(("0.0.0.0", 0))  # like the forwarder; the rule is what closes it
    forwarder.listen(4)
    other = socket.socket()
    other.bind(("0.0.0.0", 0))
    other.listen(4)
    port, other_port = forwarder.getsockname()[1], other.getsockname()[1]
    table_for_port(port)
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", peer_if, "netns", ns)
        sh("ip", "addr", "add", f"{host_addr}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{peer_addr}/30", "dev", peer_if)
        sh("ip", "-n", ns, "link", "set", peer_if, "up")
        probe = (
            "import socket, sys\n"
            "s = socket.socket(); s.settimeout(2)\n"
            "try:\n"
            f"    s.connect(({host_addr!r}, int(sys.argv[1]))); print('open')\n"
            "except TimeoutError: print('dropped')\n"
            "except OSError as e: print('error', e)\n"
        )
        assert sh("ip", "netns", "exec", ns, "python3", "-c", probe, str(other_port)).strip() == "open"
        assert sh("ip", "netns", "exec", ns, "python3", "-c", probe, str(port)).strip() == "dropped"
    finally:
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)
        forwarder.close()
        other.close()
