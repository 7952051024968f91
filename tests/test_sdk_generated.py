"""The SDK is written once: ``sdk/_sync.py`` is generated from ``sdk/_async.py`` (scripts/gen_sync.py, unasync).

The generation is re-run in memory and compared with the committed file, so an edit to one flavour alone fails
here; the public classes of both flavours are compared name by name and signature by signature (the generated
ones and the hand-written pairs: terminals, workspaces)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest

import branchbox.sdk as sdk

ROOT = Path(__file__).resolve().parent.parent


def _gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_sync", ROOT / "scripts" / "gen_sync.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_sync", mod)
    spec.loader.exec_module(mod)
    return mod


def test_committed_sync_sdk_is_generated_from_async() -> None:
    gen = _gen()
    want = gen.generate(gen.SOURCE.read_text(encoding="utf-8"))
    have = gen.TARGET.read_text(encoding="utf-8")
    assert want == have, "sdk/_sync.py differs from what sdk/_async.py generates: edit _async.py, run `make sdk`"


def test_generation_renames_and_strips() -> None:
    """The rules themselves, on a small source: a change to one flavour shows in the other."""
    gen = _gen()
    src = (
        "from websockets.asyncio.client import connect\n"
        "\n"
        "\n"
        "class AsyncThing:\n"
        '    """``async with await AsyncThing.open() as t:``, see AsyncSandbox."""\n'
        "\n"
        "    async def go(self, http: _AsyncHttp) -> AsyncThing:\n"
        "        async with self._lock:\n"
        "            await http.aclose()\n"
        "        return AsyncThing()\n"
    )
    out = gen.generate(src)
    assert "async " not in out
    assert "await" not in out
    assert "from websockets.sync.client import connect" in out
    assert "class Thing:" in out
    assert '"""``with Thing.open() as t:``, see Sandbox."""' in out
    assert "def go(self, http: _Http) -> Thing:" in out
    assert "http.close()" in out


def _public(cls: type) -> dict[str, inspect.Signature | None]:
    out: dict[str, inspect.Signature | None] = {}
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__init__",):
            continue
        fn = value.__func__ if isinstance(value, classmethod | staticmethod) else value
        out[name] = inspect.signature(fn) if callable(fn) else None
    return out


def _strip(sig: inspect.Signature | None) -> str:
    """A signature with the flavours' own names made equal (AsyncX -> X)."""
    return str(sig).replace("Async", "").replace("Sync", "")


@pytest.mark.parametrize(
    ("sync_name", "async_name"),
    [
        ("Sandbox", "AsyncSandbox"),
        ("CommandHandle", "AsyncCommandHandle"),
        ("PtyHandle", "AsyncPtyHandle"),
    ],
)
def test_flavours_have_the_same_methods_and_signatures(sync_name: str, async_name: str) -> None:
    s, a = _public(getattr(sdk, sync_name)), _public(getattr(sdk, async_name))
    assert sorted(s) == sorted(a)
    for name in s:
        assert _strip(s[name]) == _strip(a[name]), name


def test_parts_have_the_same_methods_and_signatures() -> None:
    from branchbox.sdk import _async, _sync

    for part in ("Commands", "Files", "Pty", "Git"):
        s, a = _public(getattr(_sync, part)), _public(getattr(_async, "Async" + part))
        assert sorted(s) == sorted(a), part
        for name in s:
            assert _strip(s[name]) == _strip(a[name]), (part, name)


def test_workspace_pair_has_the_same_methods() -> None:
    """Hand-written (``Workspace.sandbox`` is a property, ``AsyncWorkspace.sandbox()`` a coroutine), so at least
    the same names and, but for ``sandbox``, the same signatures."""
    s, a = _public(sdk.Workspace), _public(sdk.AsyncWorkspace)
    assert sorted(s) == sorted(a)
    for name in set(s) - {"sandbox"}:
        assert _strip(s[name]) == _strip(a[name]), name
