"""Pure logic of the E2B facade: Connect framing, tokens and signatures, the directory diff (no daemon)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from e2b.sandbox.signature import get_signature

from branchbox.e2b import connect, idempotency
from branchbox.e2b.connect import RpcError
from branchbox.e2b.idempotency import IdempotencyKeys, KeyReusedError
from branchbox.e2b.state import basic_user, resolve_path
from branchbox.e2b.tokens import Tokens, file_signature, load_secret
from branchbox.errors import FileExistsInSandboxError, FileNotFoundInSandboxError, SandboxNotFoundError


def _env(msg: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(msg).encode()
    return struct.pack(">BI", flags, len(data)) + data


def test_envelopes_and_end_stream() -> None:
    assert connect.envelope({"a": 1}) == b"\x00\x00\x00\x00\x07" + b'{"a":1}'
    end = connect.end_stream(RpcError("not_found", "gone"))
    assert end[0] == connect.END_STREAM
    assert json.loads(end[5:]) == {"error": {"code": "not_found", "message": "gone"}}
    assert json.loads(connect.end_stream()[5:]) == {}


def test_stream_request_checks_its_envelope() -> None:
    assert connect.stream_request(_env({"x": 1}), None) == {"x": 1}
    packed = gzip.compress(b'{"z": 2}')
    assert connect.stream_request(struct.pack(">BI", 1, len(packed)) + packed, "gzip") == {"z": 2}
    for bad in (b"", b"\x00\x00\x00", _env({"x": 1})[:-1], _env({"x": 1}) + b"!", b"\x00\x00\x00\x00\x02[]"):
        with pytest.raises(RpcError) as info:
            connect.stream_request(bad, None)
        assert info.value.code == "invalid_argument"
    with pytest.raises(RpcError, match="not supported"):
        connect.stream_request(struct.pack(">BI", 1, 3) + b"abc", "br")


def test_unary_request() -> None:
    assert connect.unary_request(b"", None) == {}
    assert connect.unary_request(gzip.compress(b'{"p": "/"}'), "gzip") == {"p": "/"}
    with pytest.raises(RpcError):
        connect.unary_request(b"{nope", None)
    with pytest.raises(RpcError):
        connect.unary_request(b"abc", "gzip")  # not gzip at all


async def test_client_stream_messages_arrive_one_by_one() -> None:
    body = _env({"start": {}}) + _env({"data": {}}) + _env({}, connect.END_STREAM)
    chunks = [body[:3], body[3:12], body[12:]]
    sent = iter([{"type": "http.request", "body": c, "more_body": i < 2} for i, c in enumerate(chunks)])

    async def receive() -> dict[str, Any]:
        return next(sent)

    assert [m async for m in connect.stream_messages(receive, None)] == [{"start": {}}, {"data": {}}]
    huge = iter([{"type": "http.request", "body": struct.pack(">BI", 0, connect.MAX_MESSAGE + 1)}])

    async def receive_huge() -> dict[str, Any]:
        return next(huge)

    with pytest.raises(RpcError, match="over"):
        [m async for m in connect.stream_messages(receive_huge, None)]


def test_connect_timeout_header() -> None:
    assert connect.timeout_s(None) is None and connect.timeout_s("1500") == 1.5
    for bad in ("-1", "1e3", "12345678901", "soon"):
        with pytest.raises(RpcError):
            connect.timeout_s(bad)


def test_branchbox_errors_map_to_codes_the_sdk_reads() -> None:
    assert connect.from_branchbox(FileNotFoundInSandboxError("x")).code == "not_found"
    assert connect.from_branchbox(FileExistsInSandboxError("x")).code == "already_exists"
    gone = connect.from_branchbox(SandboxNotFoundError("x"))
    assert gone.code == "unavailable" and "was not found" in gone.message


def test_tokens_and_signatures(tmp_path: Any) -> None:
    secret = load_secret(tmp_path)
    assert load_secret(tmp_path) == secret and (tmp_path / "e2b.key").stat().st_mode & 0o777 == 0o600
    tokens = Tokens(secret)
    assert tokens.check("a", tokens.token("a")) and not tokens.check("b", tokens.token("a"))
    assert not tokens.check("a", None) and not tokens.check("a", "")
    assert Tokens(b"\0" * 32).token("a") != tokens.token("a")
    # the facade's signature is the SDK's, for every shape of URL it signs
    for user in (None, "user"):
        for expires_in in (None, 60):
            sdk = get_signature("/p", "read", user, "tok", expires_in)
            assert file_signature("/p", "read", user or "", "tok", sdk["expiration"]) == sdk["signature"]


def test_basic_user_and_paths() -> None:
    assert basic_user("Basic " + base64.b64encode(b"user:").decode()) == "user"
    assert basic_user(None) is None and basic_user("Bearer x") is None and basic_user("Basic !!!") is None
    assert resolve_path("a/b", None) == "/root/a/b" and resolve_path("~/x", "user") == "/home/user/x"
    assert resolve_path("/abs", "user") == "/abs"


def test_cli_makes_keys_in_e2b_format() -> None:
    import re

    from click.testing import CliRunner

    from branchbox.api.auth import hash_api_key
    from branchbox.cli.main import cli

    out = CliRunner().invoke(cli, ["key", "new", "--e2b"])
    assert out.exit_code == 0, out.output
    m = re.fullmatch(r"key:  (e2b_[0-9a-f]{40})\nhash: ([0-9a-f]{64})\n", out.output)
    assert m is not None and hash_api_key(m.group(1)) == m.group(2)


async def test_idempotency_keys_make_one_sandbox_per_caller_and_key() -> None:
    keys = IdempotencyKeys()
    made: list[str] = []
    gate = asyncio.Event()

    async def create() -> str:
        await gate.wait()
        made.append(f"sbx-{len(made)}")
        return made[-1]

    first = [asyncio.ensure_future(keys.once("alice", "k", b"{}", create)) for _ in range(3)]
    other = asyncio.ensure_future(keys.once("bob", "k", b"{}", create))  # another caller's key is its own
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*first) == ["sbx-0"] * 3
    assert await other == "sbx-1"
    with pytest.raises(KeyReusedError):
        await keys.once("alice", "k", b'{"other": 1}', create)

    async def fails() -> str:
        raise ValueError("bad template")

    with pytest.raises(ValueError, match="bad template"):
        await keys.once("alice", "f", b"{}", fails)
    assert await keys.once("alice", "f", b"{}", create) == "sbx-2"  # a failed first create frees the key

    slow = asyncio.Event()

    async def hangs() -> str:
        await slow.wait()
        return "never"

    gone = asyncio.ensure_future(keys.once("alice", "c", b"{}", hangs))
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(keys.once("alice", "c", b"{}", create))
    await asyncio.sleep(0)
    gone.cancel()  # the first caller went away: the one waiting creates instead
    assert await waiter == "sbx-3"
    assert len(keys) == 4


async def test_idempotency_keys_kept_in_sqlite_outlive_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a restarted daemon sees: a new IdempotencyKeys on the same file answers a key's sandbox without
    creating, refuses another body, forgets keys past the TTL, and a first create that failed left nothing."""
    db = tmp_path / "state.db"
    calls: list[str] = []

    async def create() -> str:
        calls.append("made")
        return f"sbx-{len(calls)}"

    async def fails() -> str:
        raise ValueError("bad template")

    before = IdempotencyKeys(db)
    assert await before.once("alice", "k", b"{}", create) == "sbx-1"
    with pytest.raises(ValueError, match="bad template"):
        await before.once("alice", "f", b"{}", fails)
    after = IdempotencyKeys(db)  # the restarted daemon
    assert await after.once("alice", "k", b"{}", create) == "sbx-1"
    assert calls == ["made"]
    with pytest.raises(KeyReusedError):
        await after.once("alice", "k", b'{"other": 1}', create)
    assert await after.once("bob", "k", b"{}", create) == "sbx-2"  # the key is the caller's own
    assert await after.once("alice", "f", b"{}", create) == "sbx-3"  # the failed create kept nothing
    later = idempotency._now() + idempotency.TTL_S + 1
    monkeypatch.setattr(idempotency, "_now", lambda: later)
    assert await IdempotencyKeys(db).once("alice", "k", b"{}", create) == "sbx-4"  # past the TTL: a new create
