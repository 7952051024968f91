"""``branchbox shell``: a local terminal wired to a sandbox PTY (raw mode, resize on SIGWINCH)."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType

from branchbox.sdk import Sandbox, SandboxError


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_shell(sbx: Sandbox, cmd: str | None) -> int:
    """Forward stdin to the PTY and its output to stdout until the shell exits; return its exit code."""
    size = shutil.get_terminal_size()
    stdout = sys.stdout.buffer

    def on_data(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    term = sbx.pty.create(cols=size.columns, rows=size.lines, cmd=cmd, on_data=on_data)
    r, w = os.pipe()  # woken when the shell exits, so the select below returns

    def on_winch(signum: int, frame: FrameType | None) -> None:
        s = shutil.get_terminal_size()
        with contextlib.suppress(SandboxError, OSError):
            term.resize(s.columns, s.lines)

    previous = signal.signal(signal.SIGWINCH, on_winch) if os.isatty(0) else None
    fd = sys.stdin.fileno()
    try:
        with _raw(fd):
            result: list[int] = []

            def waiter() -> None:
                try:
                    result.append(term.wait().exit_code)
                except SandboxError:
                    result.append(1)
                finally:
                    os.write(w, b"x")

            threading.Thread(target=waiter, daemon=True).start()
            stdin_open = True
            while True:
                fds = [r, fd] if stdin_open else [r]
                ready, _, _ = select.select(fds, [], [])
                if r in ready:
                    break
                data = os.read(fd, 4096)
                if not data:  # EOF on a pipe: send ^D, which a shell reading a terminal takes as end of input
                    stdin_open = False
                    with contextlib.suppress(Exception):
                        term.send_input(b"\x04")
                    continue
                with contextlib.suppress(Exception):
                    term.send_input(data)
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
        os.close(r)
        os.close(w)
    return result[0] if result else 1
