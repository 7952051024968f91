"""The import structure of src/branchbox: no module imports another that (directly or not) imports it back, and no
layer imports one above it (the layers of docs/architecture.md).

What counts as an import: every ``import``/``from ... import`` of a branchbox module, at module level, inside
functions (a lazy import is still a dependency), and under ``if TYPE_CHECKING:`` (a type is a dependency on the
other layer's API too). ``from pkg import name`` counts as an import of ``pkg`` (its ``__init__``, which may
define ``name`` or re-export it) and of ``pkg.name`` when that is a module; ``import pkg.mod as mod`` as an import
of ``pkg.mod`` only (the convention of the engineers' structure tool), so a submodule names the sibling module it
uses and a package's ``__init__`` may re-export its submodules. The package root (``branchbox/__init__.py``, lazy
exports for users) is the facade above every layer and imports nothing eagerly but ``errors`` and ``_version``:
it is left out as an imported module.

Exceptions are listed below with the issue that removes them; an exception that no longer occurs fails too, so
the list only shrinks."""

from __future__ import annotations

import ast
import functools
import shutil
from collections.abc import Iterable
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "branchbox"

# top to bottom: a package imports packages of its own row or below (rows: docs/architecture.md, "Layers")
LAYERS: list[tuple[str, ...]] = [
    ("cli", "fleet"),
    ("daemon",),
    ("api", "e2b"),
    ("workspaces",),
    ("core",),
    ("images", "storage"),
    ("backends",),
    ("agentclient",),  # the host's client of the agent
    ("agent", "net"),  # agent: the guest side (stdlib only, shipped into sandboxes as agent.FILES)
    ("sdk",),
    # plain data and helpers with no I/O that every layer shares (models, limits, timing); templates: the built-in
    # template specs (data)
    ("errors", "_version", "models", "limits", "timing", "templates"),
]

# none left: the last one (core.manager building the workspaces service, issue 20.1) went when the service moved
# above core, added to the Manager as a ManagedService (docs/architecture.md, "Layers"); keep it empty
ALLOWED_UPWARD: set[tuple[str, str]] = set()

Edge = tuple[str, str, int]  # importer, imported, line


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in src.rglob("*.py"):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: Iterable[str]) -> list[Edge]:
    """Every import of a module of ``known`` in ``path`` (module level, in functions, under TYPE_CHECKING)."""
    known = set(known)
    root = min(known, key=len)
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target

    out: list[Edge] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for hit in dict.fromkeys(resolve(t) for t in targets):
            if hit and hit not in (name, root):
                out.append((name, hit, node.lineno))
    return out


def graph(src: Path) -> list[Edge]:
    mods = modules(src)
    return [e for name, path in sorted(mods.items()) for e in imports(name, path, mods)]


@functools.cache
def _src_graph() -> tuple[Edge, ...]:
    return tuple(graph(SRC))


def rank(module: str) -> int:
    """0 is the top row. The package root is above everything."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    for i, row in enumerate(LAYERS):
        if parts[1] in row:
            return i
    raise AssertionError(f"{module}: its package is in no row of LAYERS (tests/test_structure.py): place it")


def upward(edges: Iterable[Edge]) -> list[Edge]:
    return [(a, b, line) for a, b, line in edges if rank(b) < rank(a)]


def cycles(edges: Iterable[Edge]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    succ: dict[str, set[str]] = {}
    for a, b, _ in edges:
        succ.setdefault(a, set()).add(b)
        succ.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


# ------------------------------------------------------------------ the checks


def test_no_upward_imports_between_layers() -> None:
    found = upward(_src_graph())
    unexpected = sorted(e for e in found if (e[0], e[1]) not in ALLOWED_UPWARD)
    assert not unexpected, "imports of a layer above (see LAYERS):\n" + "\n".join(
        f"  {a} -> {b} (line {line})" for a, b, line in unexpected
    )
    stale = ALLOWED_UPWARD - {(a, b) for a, b, _ in found}
    assert not stale, f"these exceptions no longer occur: remove them from ALLOWED_UPWARD: {stale}"


def test_no_import_cycles() -> None:
    found = cycles(_src_graph())
    assert not found, "import cycles (see the module docstring for what counts):\n" + "\n".join(
        f"  {' <-> '.join(sorted(c))}" for c in found
    )


def package_edges(edges: Iterable[Edge]) -> dict[tuple[str, str], Edge]:
    """The imports between sub-packages and top-level modules of branchbox (``branchbox.core``, ``branchbox.errors``):
    one example module-level edge per pair. The root is left out (the facade of lazy exports)."""
    out: dict[tuple[str, str], Edge] = {}
    for a, b, line in edges:
        pa, pb = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
        if "." in a and "." in b and pa != pb:
            out.setdefault((pa, pb), (a, b, line))
    return out


def test_no_cycles_between_packages() -> None:
    """A package (or top-level module) never imports one that imports it back, through any of their modules."""
    between = package_edges(_src_graph())
    allowed = {(".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])) for a, b in ALLOWED_UPWARD}
    found = cycles((a, b, 0) for a, b in between if (a, b) not in allowed)
    assert not found, "import cycles between packages:\n" + "\n".join(
        f"  {' <-> '.join(sorted(c))}: "
        + ", ".join(f"{e[0]} -> {e[1]} (line {e[2]})" for (a, b), e in sorted(between.items()) if {a, b} <= c)
        for c in found
    )


def test_every_package_has_a_row_and_every_row_names_a_package() -> None:
    mods = modules(SRC)
    for name in mods:
        rank(name)  # raises for a package missing from LAYERS
    tops = {name.split(".")[1] for name in mods if "." in name}
    assert not {p for row in LAYERS for p in row} - tops, "LAYERS names a package that is gone"


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The same functions on a small package with one upward import, one cycle through a function-local import,
    one through a TYPE_CHECKING import and one through a package's ``__init__`` that re-exports a submodule which
    takes a sibling from the package (``import pkg.mod as mod`` does not close that circle)."""
    pkg = tmp_path / "branchbox"
    for rel, text in {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "from branchbox.cli import main\n",  # upward
        "cli/__init__.py": "",
        "cli/main.py": "def f():\n    from branchbox.core import a\n",
        "net/__init__.py": "",
        "net/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from branchbox.net import y\n",
        "net/y.py": "from . import x\n",
        "api/__init__.py": "from branchbox.api.app import create\n",
        "api/app.py": "from branchbox.api import routes\nimport branchbox.api.streams as streams\n",
        "api/routes.py": "",
        "api/streams.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    edges = graph(pkg)
    assert [(a, b) for a, b, _ in upward(edges)] == [
        ("branchbox.core.a", "branchbox.cli"),
        ("branchbox.core.a", "branchbox.cli.main"),
    ]
    assert set(cycles(edges)) == {
        frozenset({"branchbox.core.a", "branchbox.cli.main"}),
        frozenset({"branchbox.net.x", "branchbox.net.y"}),
        frozenset({"branchbox.api", "branchbox.api.app"}),
    }
    # and between packages: core and cli import each other (through core.a and cli.main)
    assert cycles((a, b, 0) for a, b in package_edges(edges)) == [frozenset({"branchbox.core", "branchbox.cli"})]


def test_the_core_workspaces_cycle_cannot_come_back(tmp_path: Path) -> None:
    """Issue 20.1: core names no workspaces type (the service is added to the Manager from above). The source with
    core.manager building the service again, even in a function, fails the upward and the package-cycle checks."""
    shutil.copytree(SRC, tmp_path / "branchbox", ignore=shutil.ignore_patterns("__pycache__"))
    manager = tmp_path / "branchbox" / "core" / "manager.py"
    back = "def _ws(m):\n    from branchbox.workspaces.service import WorkspaceService\n    return WorkspaceService\n"
    manager.write_text(manager.read_text() + "\n\n" + back)
    edges = graph(tmp_path / "branchbox")
    assert ("branchbox.core.manager", "branchbox.workspaces.service") in {(a, b) for a, b, _ in upward(edges)}
    found = cycles((a, b, 0) for a, b in package_edges(edges))
    assert any({"branchbox.core", "branchbox.workspaces"} <= c for c in found), found
    assert not [e for e in upward(graph(SRC)) if e[0].startswith("branchbox.core")]  # and today there is none


def test_http_front_overrides_only_hooks_the_pinned_uvicorn_has() -> None:
    """daemon/http_front.py subclasses uvicorn's private HttpToolsProtocol: every method it overrides must exist
    in the uvicorn installed (pyproject pins the range where they do); a renamed hook would silently stop being
    called."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from branchbox.daemon.http_front import FrontProtocol

    tree = ast.parse((SRC / "daemon" / "http_front.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == FrontProtocol.__name__)
    overridden = [n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    calls_super = {
        n.func.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Call)
        and getattr(n.func.value.func, "id", "") == "super"
    }
    assert calls_super, "http_front no longer extends uvicorn's methods: revisit this test and the pin"
    for name in calls_super:
        assert hasattr(HttpToolsProtocol, name), f"uvicorn's HttpToolsProtocol has no {name}: check the pin"
    assert "_start_asgi_task" in overridden


def test_one_http_client_stack() -> None:
    """The product makes its HTTP requests (SDK, CLI, fleet controller and agents) with the SDK's own client
    (sdk/_http1, _wire, _awire; docs/api.md has the measurement): nothing under src imports httpx, h11 or
    requests, at module level or inside a function. Tests and benches may (an independent client, a baseline)."""
    other = ("httpx", "httpcore", "h11", "requests", "aiohttp", "urllib3", "http.client")
    found = []
    for name, path in modules(SRC).items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            found += [(name, n) for n in names if n in other or n.startswith(tuple(o + "." for o in other))]
    assert found == []
