"""Generate the sync SDK (``src/branchbox/sdk/_sync.py``) from the async one (``_async.py``) with unasync.

    python scripts/gen_sync.py            # rewrite _sync.py
    python scripts/gen_sync.py --check    # exit 1 (and say so) when the committed _sync.py is out of date

``make sdk`` runs the first. The async module is the only one to edit; tests/test_sdk_generated.py re-runs
:func:`generate` in memory and fails when the committed file differs. unasync drops ``async``/``await`` and
renames tokens by the table below (plus its own: ``__aenter__``, ``asynccontextmanager``, ``AsyncIterator``...);
names are also renamed inside strings (docstrings, messages, ``__repr__``), word by word, and ``await``
(``async`` before with/for/def) written in a docstring's example is dropped. Other ``AsyncX`` names become ``X``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenize_rt
import unasync

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "branchbox" / "sdk" / "_async.py"
TARGET = ROOT / "src" / "branchbox" / "sdk" / "_sync.py"

# async name -> sync name (besides unasync's defaults and the AsyncX -> X rule)
REPLACEMENTS = {
    "_AsyncHttp": "_Http",
    "_awire": "_wire",
    "AsyncWire": "Wire",
    "AsyncClient": "Client",  # httpx
    "asyncio": "sync",  # websockets.asyncio.client -> websockets.sync.client (the module imports no asyncio)
    "aclose": "close",
    "aread": "read",
    "aiter_lines": "iter_lines",
    "aiter_bytes": "iter_bytes",
    "acall": "call",  # _concurrency
    "aoffload": "offload",  # _concurrency
    "_achunks": "_chunks",
}

HEADER = "# Generated from _async.py by scripts/gen_sync.py (unasync). Do not edit: edit _async.py, run `make sdk`.\n"

_ASYNC_NAME = re.compile(r"\b_?Async([A-Z]\w*)")
_AWAIT_IN_TEXT = re.compile(r"\bawait (?=\w)|\basync (?=with |for |def )")


class _Rule(unasync.Rule):  # type: ignore[misc]
    """unasync's rule, with names renamed inside strings too and ``AsyncX`` -> ``X`` (not ``SyncX``)."""

    def __init__(self) -> None:
        super().__init__(fromdir="/_async.py", todir="/_sync.py", additional_replacements=REPLACEMENTS)
        self._words = re.compile(
            r"\b(" + "|".join(map(re.escape, sorted(self.token_replacements, key=len)[::-1])) + r")\b"
        )

    def _unasync_name(self, name: str) -> str:
        if name.isidentifier():
            if name in self.token_replacements:
                return str(self.token_replacements[name])
            return _ASYNC_NAME.sub(lambda m: ("_" if m.group(0).startswith("_") else "") + m.group(1), name)
        # a string's text: rename word by word, drop await/async written in examples
        text = self._words.sub(lambda m: str(self.token_replacements[m.group(1)]), name)
        text = _ASYNC_NAME.sub(lambda m: ("_" if m.group(0).startswith("_") else "") + m.group(1), text)
        return _AWAIT_IN_TEXT.sub("", text)

    def tokens(self, tokens: Iterable[tokenize_rt.Token]) -> Iterator[tokenize_rt.Token]:
        return self._unasync_tokens(list(tokens))  # type: ignore[no-any-return]


def _ruff() -> str:
    """The project's ruff (a dev dependency), next to this interpreter or on PATH."""
    here = Path(sys.executable).parent / "ruff"
    found = str(here) if here.exists() else shutil.which("ruff")
    if found is None:
        raise SystemExit("ruff not found: pip install -e '.[dev]'")
    return found


def _tidy(text: str) -> str:
    """Imports sorted and lines re-wrapped as ``make format`` would (renames change names' lengths and order)."""
    name = str(TARGET.relative_to(ROOT))
    for argv in (["check", "--select", "I", "--fix", "--quiet", "--exit-zero"], ["format", "--quiet"]):
        text = subprocess.run(
            [_ruff(), *argv, "--stdin-filename", name, "-"],
            input=text, capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout  # fmt: skip
    return text


def generate(source: str) -> str:
    """The sync module for the async module's text ``source``."""
    tokens = tokenize_rt.src_to_tokens(source)
    return _tidy(HEADER + tokenize_rt.tokens_to_src(_Rule().tokens(tokens)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that _sync.py is up to date")
    args = ap.parse_args()
    want = generate(SOURCE.read_text(encoding="utf-8"))
    have = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    if args.check:
        if want != have:
            print(f"{TARGET} is out of date: run `make sdk` (python scripts/gen_sync.py)", file=sys.stderr)
            return 1
        return 0
    if want != have:
        TARGET.write_text(want, encoding="utf-8")
        print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
