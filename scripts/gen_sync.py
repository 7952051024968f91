"""Generate the sync SDK from the async one with unasync: each ``src/branchbox/sdk/_async*.py`` (the sandbox object,
its commands, files and connections) has a twin ``_sync*.py``.

    python scripts/gen_sync.py            # rewrite the _sync*.py twins
    python scripts/gen_sync.py --check    # exit 1 (and say which) when a committed twin is out of date or missing

``make sdk`` runs the first. The async modules are the only ones to edit; tests/test_sdk_generated.py re-runs
:func:`generate` in memory and fails when a committed twin differs (or a source has none). Module names are
renamed too (``_async_files`` -> ``_sync_files``). unasync drops ``async``/``await`` and
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
SDK = ROOT / "src" / "branchbox" / "sdk"


def twin(source: Path) -> Path:
    """``_async_files.py`` -> ``_sync_files.py``."""
    return source.with_name("_sync" + source.name.removeprefix("_async"))


SOURCES = sorted(SDK.glob("_async*.py"))
PAIRS = [(s, twin(s)) for s in SOURCES]

# async name -> sync name (besides unasync's defaults and the AsyncX -> X rule)
REPLACEMENTS = {
    "_AsyncHttp": "_Http",
    "_awire": "_wire",
    "AsyncWire": "Wire",
    "asyncio": "sync",  # websockets.asyncio.client -> websockets.sync.client (the module imports no asyncio)
    "aclose": "close",
    "aread": "read",
    "aiter_lines": "iter_lines",
    "aiter_bytes": "iter_bytes",
    "acall": "call",  # _concurrency
    "aoffload": "offload",  # _concurrency
    "_achunks": "_chunks",
    # the source modules themselves: _async_http -> _sync_http, ...
    **{s.stem: twin(s).stem for s in SOURCES if s.stem != "_async"},
}

HEADER = "# Generated from {0} by scripts/gen_sync.py (unasync): edit {0}, then run `make sdk`.\n"

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


def _tidy(text: str, target: Path) -> str:
    """Imports sorted and lines re-wrapped as ``make format`` would (renames change names' lengths and order)."""
    name = str(target.relative_to(ROOT))
    for argv in (["check", "--select", "I", "--fix", "--quiet", "--exit-zero"], ["format", "--quiet"]):
        text = subprocess.run(
            [_ruff(), *argv, "--stdin-filename", name, "-"],
            input=text, capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout  # fmt: skip
    return text


def generate(source: str, name: str = "_async.py") -> str:
    """The sync module for the text ``source`` of the async module ``name`` (a file of ``SOURCES``)."""
    tokens = tokenize_rt.src_to_tokens(source)
    return _tidy(HEADER.format(name) + tokenize_rt.tokens_to_src(_Rule().tokens(tokens)), twin(SDK / name))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the _sync*.py twins are up to date")
    args = ap.parse_args()
    stale = []
    for source, target in PAIRS:
        want = generate(source.read_text(encoding="utf-8"), source.name)
        have = target.read_text(encoding="utf-8") if target.exists() else ""
        if want == have:
            continue
        if args.check:
            stale.append(target)
        else:
            target.write_text(want, encoding="utf-8")
            print(f"wrote {target.relative_to(ROOT)}")
    for target in stale:
        print(f"{target} is out of date: run `make sdk` (python scripts/gen_sync.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
