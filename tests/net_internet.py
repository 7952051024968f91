"""The tests' own "internet": run inside a test network namespace (``nsenter --net=... python -m
tests.net_internet``). Serves HTTP on port 80 of every address (the body names the address that was asked)
UDP port 9999 records what it receives (``GET /udp`` lists it), and DNS on port 53 (UDP and TCP) of the first
argument's address, from a fixed zone given as ``name=address``
arguments. Prints ``ready``.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

UDP_SEEN: list[str] = []  # payloads that reached UDP port 9999 (GET /udp lists them)


class _Http(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.connection.getsockname()[0]}".encode()
        if self.path == "/udp":
            body = "\n".join(UDP_SEEN).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _answer(zone: dict[str, str], data: bytes) -> bytes:
    request = DNSRecord.parse(data)
    reply = request.reply()
    qname = str(request.q.qname).rstrip(".").lower()
    if qname in zone:
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(zone[qname]), ttl=60))
    else:
        reply.header.rcode = RCODE.NXDOMAIN
    return bytes(reply.pack())


def main(argv: list[str]) -> None:
    dns_address, *entries = argv  # DNS binds one address: replies must come from the address that was asked
    zone = dict(arg.split("=", 1) for arg in entries)

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(_answer(zone, data), self.client_address)

    class Sink(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            UDP_SEEN.append(self.request[0].decode(errors="replace"))

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            size = struct.unpack("!H", self.rfile.read(2))[0]
            reply = _answer(zone, self.rfile.read(size))
            self.wfile.write(struct.pack("!H", len(reply)) + reply)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    servers: list[socketserver.BaseServer] = [
        ThreadingHTTPServer(("0.0.0.0", 80), _Http),
        socketserver.ThreadingUDPServer((dns_address, 53), Udp),
        socketserver.ThreadingTCPServer((dns_address, 53), Tcp),
        socketserver.ThreadingUDPServer(("0.0.0.0", 9999), Sink),
    ]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    main(sys.argv[1:])
