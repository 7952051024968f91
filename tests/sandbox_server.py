"""A stdlib-only HTTP + WebSocket echo server that tests copy into a sandbox (``python3 server.py PORT``).

HTTP: any method answers JSON ``{"method", "path", "headers", "body"}``; ``GET /big?n=N`` streams N bytes.
WebSocket (``Upgrade: websocket``): echoes every text or binary message, closes when the client closes.
"""

import base64
import hashlib
import json
import socket
import struct
import sys
import threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_request(f):
    line = f.readline().decode("latin-1").strip()
    if not line:
        return None
    method, path, _ = line.split(" ", 2)
    headers = {}
    while True:
        h = f.readline().decode("latin-1").strip()
        if not h:
            break
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    return method, path, headers


def recv_exact(f, n):
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return data


def ws_frame(opcode, payload):
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def websocket(conn, f, headers):
    accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest())
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    while True:
        b1, b2 = recv_exact(f, 2)
        opcode, n = b1 & 0x0F, b2 & 0x7F
        if n == 126:
            n = struct.unpack("!H", recv_exact(f, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", recv_exact(f, 8))[0]
        mask = recv_exact(f, 4) if b2 & 0x80 else b"\0\0\0\0"
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(recv_exact(f, n)))
        if opcode == 8:
            conn.sendall(ws_frame(8, payload[:2]))
            return
        if opcode == 9:
            conn.sendall(ws_frame(10, payload))
        elif opcode in (1, 2):
            conn.sendall(ws_frame(opcode, payload))


def handle(conn):
    f = conn.makefile("rb")
    try:
        while True:
            req = read_request(f)
            if req is None:
                return
            method, path, headers = req
            if headers.get("upgrade", "").lower() == "websocket":
                websocket(conn, f, headers)
                return
            body = recv_exact(f, int(headers.get("content-length", "0") or 0))
            if path.startswith("/big"):
                n = int(path.split("n=")[1])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                chunk = b"x" * 65536
                while n > 0:
                    conn.sendall(chunk[: min(n, len(chunk))])
                    n -= len(chunk)
                continue
            out = json.dumps(
                {"method": method, "path": path, "headers": headers, "body": body.decode("latin-1")}
            ).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Sandbox: yes\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(out), out)
            )
    except (EOFError, OSError, ValueError):
        pass
    finally:
        conn.close()


def main():
    bind = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
    srv = socket.create_server((bind, int(sys.argv[1])), backlog=128)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
