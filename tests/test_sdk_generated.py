"""The SDK is written once: each ``sdk/_sync*.py`` is generated from its ``sdk/_async*.py`` (scripts/gen_sync.py,
unasync): the sandbox object (``_sync.py``), its commands, files and connections (``_sync_commands.py``...).

The generation is re-run in memory and compared with each committed twin, so an edit to one flavour alone fails
here (and so does a source module without a twin); the public classes of both flavours are compared name by name
and signature by signature (the generated ones and the hand-written pairs: terminals, workspaces)."""

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


SDK = ROOT / "src" / "branchbox" / "sdk"
SOURCES = sorted(p.name for p in SDK.glob("_async*.py"))


def test_every_async_module_is_a_source() -> None:
    assert SOURCES == ["_async.py", "_async_commands.py", "_async_files.py", "_async_http.py"]
    assert [s.name for s, _ in _gen().PAIRS] == SOURCES


@pytest.mark.parametrize("source", SOURCES)
def test_committed_sync_sdk_is_generated_from_async(source: str) -> None:
    gen = _gen()
    target = gen.twin(SDK / source)
    assert target.exists(), f"{source} has no sync twin {target.name}: run `make sdk`"
    want = gen.generate((SDK / source).read_text(encoding="utf-8"), source)
    have = target.read_text(encoding="utf-8")
    assert want == have, f"sdk/{target.name} differs from what sdk/{source} generates: edit {source}, run `make sdk`"


def test_a_drifted_twin_is_caught(tmp_path: Path) -> None:
    """The comparison above sees a one-character edit of a twin (the check cannot pass vacuously)."""
    gen = _gen()
    source = SDK / "_async_files.py"
    want = gen.generate(source.read_text(encoding="utf-8"), source.name)
    have = gen.twin(source).read_text(encoding="utf-8")
    assert want == have
    assert want != have.replace("def exists(", "def exist(", 1)


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
    from branchbox.sdk import _async_commands, _async_files, _sync_commands, _sync_files

    for sync_mod, async_mod, part in [
        (_sync_commands, _async_commands, "Commands"),
        (_sync_files, _async_files, "Files"),
        (_sync_commands, _async_commands, "Pty"),
        (_sync_commands, _async_commands, "Git"),
    ]:
        s, a = _public(getattr(sync_mod, part)), _public(getattr(async_mod, "Async" + part))
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
