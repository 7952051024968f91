"""Faults, tested (issue 21.5): the agent of one sandbox killed or stopped from the host. Calls in flight and new
calls fail fast with a clear error, the sandbox is marked error, and the daemon keeps serving the others.

Through the SDK against a real daemon, as a user meets the fault."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from branchbox.sdk import Sandbox
from branchbox.sdk._errors import InvalidStateError, SandboxError
from tests.conftest import DaemonProc

pytestmark = [pytest.mark.root, pytest.mark.template, pytest.mark.reliability]

HANG_GUARD_S = 60.0  # far below the commands' own 3600 s: a call that waits for its command hangs past this


def init_pid(daemon: DaemonProc, sandbox_id: str) -> int:
    """Host pid of the sandbox's init (the agent: pid 1 of the sandbox's pid namespace)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cgroups = Path(f"/proc/{name}/cgroup").read_text()
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if f"/{daemon.cgroup_parent}/{sandbox_id}" in cgroups and nspid[-1:] == ["1"]:
            return int(name)
    raise AssertionError(f"no init process found for sandbox {sandbox_id}")


class InFlight:
    """A blocking SDK call run on a thread: what it returned or raised once it ended."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = threading.Event()

        def run() -> None:
            self.started.set()
            try:
                self.result = fn()
            except BaseException as exc:  # handed to the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.started.wait()

    def outcome(self) -> BaseException | None:
        self.thread.join(HANG_GUARD_S)
        assert not self.thread.is_alive(), f"the call still hangs after {HANG_GUARD_S} s"
        return self.error


def wait_running_process(sbx: Sandbox, needle: str) -> None:
    """Until a process whose command line holds ``needle`` runs in the sandbox (event: the agent's own list)."""
    for _ in range(200):
        if any(needle in " ".join(p.cmd) for p in sbx.commands.list()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never started")


@contextmanager
def two_sandboxes(daemon: DaemonProc) -> Iterator[tuple[Sandbox, Sandbox]]:
    victim = Sandbox.create(base_url=daemon.url)
    other = Sandbox.create(base_url=daemon.url)
    try:
        yield victim, other
    finally:
        for s in (victim, other):
            s.kill()
            s.close()


def assert_marked_error(victim: Sandbox, *words: str) -> None:
    info = victim.get_info()
    assert info.state == "error", info
    assert info.error is not None and all(w in info.error for w in words), info.error


def assert_others_served(daemon: DaemonProc, other: Sandbox) -> None:
    assert other.commands.run("echo still-here").stdout.strip() == "still-here"
    with Sandbox.create(base_url=daemon.url) as fresh:
        assert fresh.commands.run("echo new").stdout.strip() == "new"


def test_a_killed_agent_fails_calls_at_once_and_marks_the_sandbox_error(daemon: DaemonProc) -> None:
    with two_sandboxes(daemon) as (victim, other):
        call = InFlight(lambda: victim.commands.run("sleep 3600"))
        wait_running_process(victim, "sleep 3600")
        os.kill(init_pid(daemon, victim.sandbox_id), signal.SIGKILL)
        err = call.outcome()
        assert isinstance(err, InvalidStateError), err
        assert "init process exited" in str(err)
        with pytest.raises(InvalidStateError, match="error"):
            victim.commands.run("true")
        assert_marked_error(victim, "init process exited")
        assert_others_served(daemon, other)


def test_a_stopped_agent_fails_calls_fast_and_marks_the_sandbox_error(daemon: DaemonProc) -> None:
    with two_sandboxes(daemon) as (victim, other):
        victim.files.write("/work/big.bin", b"x" * (4 << 20))
        pid = init_pid(daemon, victim.sandbox_id)
        call = InFlight(lambda: victim.commands.run("sleep 3600"))
        wait_running_process(victim, "sleep 3600")
        os.kill(pid, signal.SIGSTOP)
        try:
            err = call.outcome()
            assert isinstance(err, InvalidStateError), err
            assert "stopped (SIGSTOP" in str(err)
            assert_marked_error(victim, "stopped", str(pid))
            # calls after the fault are refused at once, streams included
            for fn in (lambda: victim.commands.run("true"), lambda: victim.files.read("/work/big.bin")):
                with pytest.raises(SandboxError, match="error"):
                    fn()
            assert_others_served(daemon, other)
        finally:
            os.kill(pid, signal.SIGCONT)
        # it stays in error (kept for inspection) until destroyed; the destroy frees everything
        assert victim.get_info().state == "error"
        assert victim.kill()
        assert not [p for p in daemon.leftovers() if victim.sandbox_id in p]


def test_an_agent_stopped_while_idle_fails_the_next_call(daemon: DaemonProc) -> None:
    with two_sandboxes(daemon) as (victim, other):
        pid = init_pid(daemon, victim.sandbox_id)
        os.kill(pid, signal.SIGSTOP)
        try:
            err = InFlight(lambda: victim.files.list("/")).outcome()
            assert isinstance(err, InvalidStateError) and "stopped (SIGSTOP" in str(err), err
            assert_marked_error(victim, "stopped")
            assert_others_served(daemon, other)
        finally:
            os.kill(pid, signal.SIGCONT)
