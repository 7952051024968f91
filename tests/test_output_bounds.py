"""Bounded output (issue 21.1): whatever a sandbox prints, the daemon's memory per call stays bounded and every
call ends. Through the SDK against a real daemon, in a 512 MB sandbox, as a user reaches it."""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import httpx
import pytest

from branchbox.sdk import BadRequestError, Sandbox
from tests.conftest import DaemonProc

MiB = 1 << 20
CAP = 64 * MiB  # the daemon's default max_output_mb, and the SDK's streamed-run default
BIG = int(os.environ.get("BRANCHBOX_TEST_OUTPUT_MB", "2048")) * MiB  # what the command prints
# The daemon's peak RSS may grow by at most this much over its idle RSS while the calls run.
RSS_BOUND = 300 * MiB


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found["VmRSS"], found["VmHWM"]


@pytest.fixture
def bounded(daemon: DaemonProc) -> Any:
    assert daemon.proc is not None
    with Sandbox.create(base_url=daemon.url, memory_mb=512, timeout=900) as sbx:
        sbx.commands.run("true")
        yield sbx, daemon.proc.pid


@pytest.mark.slow
def test_foreground_run_of_huge_output_ends_truncated_and_bounded(bounded: Any) -> None:
    sbx, pid = bounded
    idle, _ = _rss(pid)
    t0 = time.monotonic()
    # the reproduction of issue 21: 'head -c 1500M /dev/zero' grew the daemon to 9 GB and never returned
    r = sbx.commands.run(f"head -c {BIG} /dev/zero | tr '\\0' x; echo done >&2", timeout=600, request_timeout=900)
    took = time.monotonic() - t0
    _, peak = _rss(pid)
    assert (r.exit_code, r.stderr, r.stderr_truncated) == (0, "done\n", False)
    assert r.stdout_truncated is True
    assert len(r.stdout) == CAP and set(r.stdout) == {"x"}
    print(f"run of {BIG // MiB} MiB: {took:.1f} s, daemon RSS {idle // MiB} MiB, peak +{(peak - idle) // MiB} MiB")
    assert peak - idle < RSS_BOUND, f"daemon peak RSS grew by {(peak - idle) // MiB} MiB (in {took:.0f} s)"


@pytest.mark.slow
def test_foreground_run_of_nul_bytes_is_written_in_parts_and_bounded(bounded: Any) -> None:
    """The issue's own command: NUL bytes, which JSON writes as ``\\u0000`` (6 bytes each). The 64 MiB kept are
    384 MiB of JSON: built whole, the daemon peaked at +850 MiB; written in parts, it holds the kept output."""
    sbx, pid = bounded
    idle, _ = _rss(pid)
    t0 = time.monotonic()
    r = sbx.commands.run(f"head -c {BIG // 2} /dev/zero", timeout=600, request_timeout=900)
    took = time.monotonic() - t0
    _, peak = _rss(pid)
    assert (r.exit_code, r.stdout_truncated, len(r.stdout), r.stderr) == (0, True, CAP, "")
    assert r.stdout.count("\0") == CAP
    print(
        f"run of {BIG // 2 // MiB} MiB of NULs: {took:.1f} s, daemon RSS {idle // MiB} MiB, +{(peak - idle) // MiB} MiB"
    )
    assert peak - idle < RSS_BOUND, f"daemon peak RSS grew by {(peak - idle) // MiB} MiB (in {took:.0f} s)"


def test_a_large_run_result_is_the_same_json_on_every_path(daemon: DaemonProc) -> None:
    """A result over 1 MiB is written in parts, with its content-length, identical to the whole-body encoding:
    through the SDK, the daemon's own HTTP path (a plain request) and FastAPI's (a chunked request body)."""
    with Sandbox.create(base_url=daemon.url) as sbx:
        made = sbx.commands.run(
            "head -c 1500000 /dev/urandom > /r; printf '\\0\"\\\\\\n\\377 \\342\\202' >> /r; "
            "head -c 700000 /dev/zero | tr '\\0' 'e' >&2"
        )
        assert made.exit_code == 0, made.stderr
        raw = io.BytesIO()
        sbx.files.download("/r", raw)
        want = raw.getvalue().decode("utf-8", "replace")
        assert len(raw.getvalue()) == 1500000 + 8 and "\0" in want and "\ufffd" in want
        url = f"{daemon.url}/v1/sandboxes/{sbx.sandbox_id}/commands"
        body = json.dumps({"cmd": "cat /r; head -c 700000 /dev/zero | tr '\\0' 'e' >&2"}).encode()
        plain = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
        chunked = httpx.post(
            url, content=iter([body[:5], body[5:]]), headers={"content-type": "application/json"}, timeout=60
        )
        for resp in (plain, chunked):
            assert resp.status_code == 200 and int(resp.headers["content-length"]) == len(resp.content)
            got = resp.json()
            assert (got["stdout"], got["stderr"], got["exit_code"]) == (want, "e" * 700000, 0)
            assert (got["stdout_truncated"], got["stderr_truncated"], got["signal"]) == (False, False, None)
        assert plain.content.split(b',"duration_ms"')[0] == chunked.content.split(b',"duration_ms"')[0]
        r = sbx.commands.run("cat /r; head -c 700000 /dev/zero | tr '\\0' 'e' >&2")
        assert (r.stdout, r.stderr, r.exit_code) == (want, "e" * 700000, 0)


@pytest.mark.slow
def test_streamed_and_background_runs_apply_backpressure(bounded: Any) -> None:
    sbx, pid = bounded
    idle, _ = _rss(pid)
    seen = [0]

    def count(text: str) -> None:
        seen[0] += len(text)

    size = BIG // 8
    r = sbx.commands.run(f"head -c {size} /dev/zero | tr '\\0' s", on_stdout=count, timeout=600, request_timeout=900)
    assert (r.exit_code, seen[0], len(r.stdout), r.stdout_truncated) == (0, size, CAP, True)
    seen[0] = 0
    h = sbx.commands.run(f"sleep 1; head -c {size} /dev/zero | tr '\\0' b", background=True, timeout=600)
    res = h.wait(on_stdout=count)  # attached late, it may miss the start (beyond the replayed 128 KiB tail)
    assert res.exit_code == 0 and CAP < seen[0] <= size
    assert (len(res.stdout), res.stdout_truncated) == (CAP, True)
    _, peak = _rss(pid)
    print(f"streamed+background: daemon RSS idle {idle // MiB} MiB, peak +{(peak - idle) // MiB} MiB")
    assert peak - idle < RSS_BOUND, f"daemon peak RSS grew by {(peak - idle) // MiB} MiB"


def test_run_output_limit_per_call(daemon: DaemonProc) -> None:
    """``max_output`` lowers the limit for one call (never above the daemon's); output under it is whole."""
    with Sandbox.create(base_url=daemon.url) as sbx:
        url = f"{daemon.url}/v1/sandboxes/{sbx.sandbox_id}/commands"
        body = {"cmd": "head -c 5000 /dev/zero | tr '\\0' y; seq 3 >&2", "max_output": 1000}
        r = httpx.post(url, json=body, timeout=60).json()
        assert (r["stdout"], r["stdout_truncated"]) == ("y" * 1000, True)
        assert (r["stderr"], r["stderr_truncated"]) == ("1\n2\n3\n", False)
        five_k = "head -c 5000 /dev/zero | tr '\\0' y"
        for streamed in (None, lambda _: None):  # the SDK's max_output: plain (the daemon's) and streamed
            small = sbx.commands.run(five_k, max_output=1000, on_stdout=streamed)
            assert (small.stdout, small.stdout_truncated) == ("y" * 1000, True)
        whole = sbx.commands.run("seq 3")
        assert (whole.stdout, whole.stdout_truncated, whole.stderr_truncated) == ("1\n2\n3\n", False, False)
        bad = httpx.post(url, json={"cmd": "true", "max_output": -1}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"


class _Counter:
    """A binary sink that only counts (download's target)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)


@pytest.mark.slow
def test_files_read_of_a_huge_file_is_refused_and_download_streams_it(bounded: Any) -> None:
    sbx, pid = bounded
    idle, _ = _rss(pid)
    size = BIG // 8
    setup = sbx.commands.run(f"truncate -s {BIG} /huge && head -c {size} /dev/urandom > /big && echo -n hi > /small")
    assert setup.exit_code == 0, setup.stderr
    with pytest.raises(BadRequestError, match="stream it instead") as info:
        sbx.files.read("/huge")  # refused before any byte: nothing read into the daemon or the client
    assert (info.value.code, info.value.status) == ("payload_too_large", 413)
    assert sbx.files.read("/small") == "hi"
    with pytest.raises(BadRequestError, match="stream it instead"):
        sbx.files.read("/small", max_size=1)
    counter = _Counter()
    assert sbx.files.download("/big", counter) == size == counter.n  # type: ignore[arg-type]
    _, peak = _rss(pid)
    print(f"download of {size // MiB} MiB: daemon RSS {idle // MiB} MiB, peak +{(peak - idle) // MiB} MiB")
    assert peak - idle < RSS_BOUND, f"daemon peak RSS grew by {(peak - idle) // MiB} MiB"
