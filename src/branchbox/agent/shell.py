"""Shell heuristics of ``exec``: run a command line without a shell when that means the same (see
docs/agent-protocol.md), else under bash (or sh)."""

from __future__ import annotations

import os
import re
import shutil

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_WORD = r"[A-Za-z0-9_./:=,@%+-]+"
_SIMPLE = re.compile(rf" *{_WORD}(?: +{_WORD})* *")
SHELL_WORDS = frozenset(
    """. : [ [[ ]] alias bg bind break builtin caller case cd command compgen complete compopt continue
    coproc declare dirs disown do done echo elif else enable esac eval exec exit export false fc fg fi for
    function getopts hash help history if in jobs kill let local logout mapfile popd printf pushd pwd read
    readarray readonly return select set shift shopt source suspend test then time times trap true type
    typeset ulimit umask unalias unset until wait while""".split()  # noqa: SIM905 - a word list reads better
)


def is_simple_command(cmd: str) -> bool:
    """True when ``cmd`` can be run without a shell with the same meaning (see the protocol doc)."""
    if not _SIMPLE.fullmatch(cmd):
        return False
    first = cmd.split(maxsplit=1)[0]
    return first not in SHELL_WORDS and "=" not in first and not first.startswith("%")


def _builtin_twin(words: list[str], path: str) -> bool:
    """True for ``true``, ``false`` (no arguments) and ``echo`` (not ``--help``/``--version``) when the program of
    that name is on ``path``: it prints and exits exactly like the bash builtin for simple words."""
    name, args = words[0], words[1:]
    if name in ("true", "false"):
        ok = not args
    elif name == "echo":
        ok = not any(a in ("--help", "--version") for a in args)
    else:
        return False
    return ok and shutil.which(name, path=path) is not None


def shell_argv(cmd: str, path: str = DEFAULT_PATH) -> list[str]:
    """The argv that runs ``cmd``: itself split on spaces when that means the same as the shell would, else a
    shell. ``path`` is the PATH the command will run with."""
    if is_simple_command(cmd):
        return cmd.split()
    if _SIMPLE.fullmatch(cmd) and _builtin_twin(words := cmd.split(), path):
        return words
    return in_shell(cmd)


def in_shell(cmd: str) -> list[str]:
    """The argv that runs ``cmd`` under bash (or sh where there is no bash)."""
    shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
    return [shell, "-c", cmd]
