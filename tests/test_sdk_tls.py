"""The SDK's client over TLS (``https://`` base URLs: a daemon behind a TLS-terminating proxy), both flavours,
against a real TLS server on loopback with a throwaway certificate: verified requests, query strings and bodies
streamed both ways; a certificate the client does not trust, or one for another name, is refused."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from branchbox.sdk import ConnectionError_
from branchbox.sdk import _awire as awire_mod
from branchbox.sdk import _requests as rq
from branchbox.sdk._config import ConnectionConfig, default_ssl_context
from branchbox.sdk._http1 import query_string
from branchbox.sdk._sync_http import _Http
from branchbox.sdk._wire import Wire
from tests.test_sdk_wire import PIECE, _Handler, _pattern


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """(port, the certificate for ``localhost`` the server presents, a certificate for another name)."""
    cert, key = _certificate(tmp_path, "localhost")
    other, _ = _certificate(tmp_path, "elsewhere.invalid")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1], cert, other
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Trust a given certificate file (SSL_CERT_FILE) in the SDK's cached TLS context, for one test."""

    def use(path: Path) -> None:
        monkeypatch.setenv("SSL_CERT_FILE", str(path))
        default_ssl_context.cache_clear()

    yield use
    default_ssl_context.cache_clear()


def test_sync_and_async_over_tls(tls_server: tuple[int, Path, Path], trust: object) -> None:
    port, cert, _ = tls_server
    trust(cert)  # type: ignore[operator]
    config = ConnectionConfig.resolve(base_url=f"https://localhost:{port}", env={}, request_timeout=30)
    data = _pattern(4 << 20)
    wire = Wire(config)
    try:
        echo = wire.request("GET", "/echo", None, 30, query=query_string([("path", "/a b")])).json()
        assert echo["target"] == "/echo?path=%2Fa%20b"

        def pieces() -> Iterator[bytes]:
            for i in range(0, len(data), PIECE):
                yield data[i : i + PIECE]

        echo = wire.request("PUT", "/echo", None, 30, content=pieces()).json()
        assert echo["sha256"] == hashlib.sha256(data).hexdigest()
        with wire.stream("GET", f"/bytes/{len(data)}", None, 30) as resp:
            assert hashlib.sha256(resp.read()).digest() == hashlib.sha256(data).digest()
    finally:
        wire.close()

    async def run() -> None:
        awire = awire_mod.acquire(config)
        try:

            async def apieces() -> AsyncIterator[bytes]:
                for i in range(0, len(data), PIECE):
                    yield data[i : i + PIECE]

            echo = (await awire.request("PUT", "/echo", None, 30, content=apieces())).json()
            assert echo["sha256"] == hashlib.sha256(data).hexdigest()
            async with awire.stream("GET", f"/length/{len(data)}", None, 30) as resp:
                assert hashlib.sha256(await resp.aread()).digest() == hashlib.sha256(data).digest()
        finally:
            awire_mod.release(config, awire)

    asyncio.run(run())


def test_an_untrusted_or_misnamed_certificate_is_refused(tls_server: tuple[int, Path, Path], trust: object) -> None:
    port, cert, other = tls_server
    trust(other)  # type: ignore[operator]  # the server's own certificate is not trusted
    http = _Http(ConnectionConfig.resolve(base_url=f"https://localhost:{port}", env={}, request_timeout=10))
    try:
        with pytest.raises(ConnectionError_, match="CERTIFICATE_VERIFY_FAILED"):
            http.send(rq.Req("GET", "/echo"))
    finally:
        http.close()
    trust(cert)  # type: ignore[operator]  # trusted, but for "localhost": 127.0.0.1 is another name
    http = _Http(ConnectionConfig.resolve(base_url=f"https://127.0.0.1:{port}", env={}, request_timeout=10))
    try:
        with pytest.raises(ConnectionError_, match="CERTIFICATE_VERIFY_FAILED"):
            http.send(rq.Req("GET", "/echo"))
    finally:
        http.close()

    async def run() -> None:
        trust(other)  # type: ignore[operator]
        config = ConnectionConfig.resolve(base_url=f"https://localhost:{port}", env={}, request_timeout=10)
        awire = awire_mod.acquire(config)
        try:
            with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
                await awire.request("GET", "/echo", None, 10)
        finally:
            awire_mod.release(config, awire)

    asyncio.run(run())
