"""Real git servers on loopback for tests and benchmarks (not used by the daemon).

* :func:`generate_repo`: a bare repository of ``files`` files and ``commits`` commits made by ``git fast-import``
  (20 000 files and 300 commits take a few seconds).
* :class:`GitDaemon`: ``git daemon`` serving a directory (``git://127.0.0.1:PORT/<name>``), with partial clone
  and fetch-by-id allowed.
* :class:`HttpGitServer`: ``git http-backend`` behind a threaded HTTP server that requires HTTP Basic auth
  (user ``git``, a token), for the credential tests.
* :class:`CuttingProxy`: a TCP proxy that forwards to a server and cuts every connection after ``cut_after``
  bytes from the server: "the server died in the middle of the fetch", deterministically.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from branchbox.workspaces.gitcmd import base_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def generate_repo(path: Path, *, files: int = 20_000, commits: int = 300, dirs: int = 200, seed: int = 1) -> None:
    """A bare repository with branch ``main``: ``files`` files in the first commit, 5 changed per later commit."""
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True, env=base_env())
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    chunks: list[bytes] = []
    per = max(1, files // dirs)

    def blob(data: bytes) -> None:
        chunks.append(b"data %d\n" % len(data))
        chunks.append(data)
        chunks.append(b"\n")

    for c in range(commits):
        msg = f"commit {c}\n".encode()
        chunks.append(b"commit refs/heads/main\ncommitter Test <test@example.com> %d +0000\n" % (1_700_000_000 + c))
        chunks.append(b"data %d\n%s\n" % (len(msg), msg))
        changes = range(files) if c == 0 else [rnd.randrange(files) for _ in range(5)]
        for i in changes:
            chunks.append(b"M 100644 inline d%03d/f%05d.txt\n" % (i // per, i))
            blob(f"file {i} v{c}\n{rnd.randbytes(rnd.randint(50, 400)).hex()}\n".encode())
    subprocess.run(["git", "-C", str(path), "fast-import", "--quiet"], input=b"".join(chunks), check=True,
                   env=base_env())  # fmt: skip
    for k, v in (("uploadpack.allowFilter", "true"), ("uploadpack.allowAnySHA1InWant", "true"),
                 ("http.receivepack", "true")):  # fmt: skip
        subprocess.run(["git", "-C", str(path), "config", k, v], check=True, env=base_env())


def commit_file(repo: Path, branch: str, name: str, content: str, *, parent: str | None = None,
                message: str = "update", delete: bool = False) -> str:  # fmt: skip
    """Add a commit to ``branch`` of bare ``repo`` changing (or ``delete``-ing) one file (``parent``: None = the
    branch tip, "" = no parent, i.e. a rewritten history as after a force push). Returns the new commit id."""
    env = base_env()
    git = ["git", "-C", str(repo)]
    blob = subprocess.run([*git, "hash-object", "-w", "--stdin"], input=content.encode(), check=True,
                          capture_output=True, env=env).stdout.decode().strip()  # fmt: skip
    base = parent if parent is not None else branch
    idx = repo / f"index-{os.getpid()}-{threading.get_ident()}"
    ienv = {**env, "GIT_INDEX_FILE": str(idx)}
    try:
        if base:
            subprocess.run([*git, "read-tree", base], check=True, env=ienv)
        if delete:
            gone = f"0 {'0' * 40}\t{name}\n".encode()  # mode 0: remove the entry (works without a work tree)
            subprocess.run([*git, "update-index", "--index-info"], input=gone, check=True, env=ienv)
        else:
            subprocess.run([*git, "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}"], check=True,
                           env=ienv)  # fmt: skip
        tree = subprocess.run([*git, "write-tree"], check=True, capture_output=True, env=ienv).stdout.decode().strip()
    finally:
        idx.unlink(missing_ok=True)
    parents = ["-p", base] if base else []
    new = subprocess.run([*git, "commit-tree", tree, *parents, "-m", message], check=True, capture_output=True,
                         env=env).stdout.decode().strip()  # fmt: skip
    subprocess.run([*git, "update-ref", f"refs/heads/{branch}", new], check=True, env=env)
    return new


class GitDaemon:
    """``git daemon`` on 127.0.0.1 serving every repository under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str, port: int | None = None) -> str:
        return f"git://127.0.0.1:{port or self.port}/{name}"

    def start(self) -> GitDaemon:
        self.proc = subprocess.Popen(
            ["git", "daemon", "--export-all", "--enable=upload-pack", "--reuseaddr", f"--base-path={self.base}",
             "--listen=127.0.0.1", f"--port={self.port}", "--informative-errors", str(self.base)],
            env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:  # readiness of a separate process: the one place that polls
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("git daemon did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)  # the daemon and its upload-pack children
            self.proc.wait(10)


class HttpGitServer:
    """Smart HTTP (``git http-backend`` as CGI) on 127.0.0.1 requiring ``Authorization: Basic`` with ``token`` as
    the password (any user name, as GitHub does).

    ``seen_authorization`` collects the Authorization headers received (tests check what git sent)."""

    def __init__(self, base: Path, token: str) -> None:
        self.base = base
        self.token = token
        self.seen_authorization: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._cgi()

            def do_POST(self) -> None:
                self._cgi()

            def _cgi(self) -> None:
                auth = self.headers.get("Authorization")
                if auth:
                    server.seen_authorization.append(auth)
                if not server.authorized(auth):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                env = {**base_env(), "GIT_PROJECT_ROOT": str(server.base), "GIT_HTTP_EXPORT_ALL": "1",
                       "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                       "REMOTE_ADDR": "127.0.0.1", "GIT_PROTOCOL": self.headers.get("Git-Protocol", "")}  # fmt: skip
                if self.headers.get("Content-Encoding") == "gzip":
                    env["HTTP_CONTENT_ENCODING"] = "gzip"
                res = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False)
                head, _, payload = res.stdout.partition(b"\r\n\r\n")
                status = 200
                headers = []
                for line in head.decode(errors="replace").split("\r\n"):
                    k, _, v = line.partition(":")
                    if k.lower() == "status":
                        status = int(v.strip().split()[0])
                    elif k:
                        headers.append((k, v.strip()))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def authorized(self, auth: str | None) -> bool:
        if not auth or not auth.startswith("Basic "):
            return False
        try:
            _, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return False
        return password == self.token

    def url(self, name: str, *, credentials: str | None = None) -> str:
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}/{name}"

    def start(self) -> HttpGitServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class CuttingProxy:
    """Forwards 127.0.0.1:port to ``target_port``; each connection is cut after ``cut_after`` bytes from the
    server (``None``: never). ``cut_count`` tells how many connections were cut."""

    def __init__(self, target_port: int, cut_after: int | None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cut_count = 0
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> CuttingProxy:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return

        def pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
            sent = 0
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if limit is not None and sent + len(data) >= limit:
                        dst.sendall(data[: max(0, limit - sent)])
                        self.cut_count += 1
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            finally:
                for s in (client, upstream):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        up = threading.Thread(target=pump, args=(client, upstream, None), daemon=True)
        up.start()
        pump(upstream, client, self.cut_after)
        up.join(5)
        client.close()
        upstream.close()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
