"""The agent's own runtime for microVM guests: the host's Python, read-only, outside the image's paths.

A template's image may have no Python (busybox, distroless) or one built on another C library (alpine's musl).
So the guest never runs the agent on the image's interpreter: it gets this read-only ext4 disk, mounted at
``/.branchbox/rt`` by the initrd, and the shim starts the agent as

    /.branchbox/rt/lib/ld-linux-x86-64.so.2 --library-path /.branchbox/rt/lib /.branchbox/rt/bin/python3 -I -S -B

The host's dynamic loader runs the host's interpreter on the host's shared libraries, copied here, and finds its
standard library by its landmark (``lib/pythonX.Y/os.py`` next to ``bin/``): nothing of the image is used, and the
image's programs (the user's commands) never see these libraries (the loader's ``--library-path`` applies to the
agent's process alone, not to what it execs). The disk holds:

```
bin/python3                    the interpreter the daemon runs on (its real executable)
lib/ld-linux-x86-64.so.2       the host's loader (the interpreter's PT_INTERP)
lib/<soname>                   every shared library the interpreter and the kept extension modules link
lib/pythonX.Y/**.py            the pure-Python standard library (with its compiled .pyc), less what no agent uses
lib/pythonX.Y/lib-dynload/     extension modules whose libraries are in KEEP_LIBS
```

It is built once per host Python build (``DATA/vm/runtime/<hash>.ext4``, the hash over every input file's path,
size and mtime plus RECIPE) and shared by every VM, like the kernel and initrd.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from branchbox.backends.microvm.image import _run, _tmpdir, _tree_bytes
from branchbox.errors import BackendError

GUEST_DIR = "/.branchbox/rt"
RECIPE = "1"  # bump when what goes into the image changes
# standard-library directories no agent imports (tests, GUIs, build tools): left out, ~90% of the tree
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
     "distutils", "site-packages", "dist-packages", "venv"}
)  # fmt: skip
# extension modules are kept when every library they link is one of these (no X11, Tcl, curses, SQLite, OpenSSL:
# the agent needs none of them, and they would double the image)
KEEP_LIBS = frozenset(
    {"libc.so.6", "libm.so.6", "libz.so.1", "libbz2.so.1.0", "liblzma.so.5", "libffi.so.8", "libexpat.so.1",
     "libuuid.so.1", "libcrypt.so.1", "libmpdec.so.3"}
)  # fmt: skip
_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)$")
_LOADER_LINE = re.compile(r"^\s*(/\S*ld-linux\S*)\s+\(0x[0-9a-f]+\)$")


def interpreter() -> Path:
    """The real executable of the Python the daemon runs on (through a virtualenv's symlink)."""
    return Path(os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_path("stdlib", vars={"installed_base": sys.base_prefix, "base": sys.base_prefix}))


def _stdlib_files(stdlib: Path) -> Iterator[Path]:
    """The pure-Python modules and their plain ``.pyc`` (no optimised ones), outside SKIP_DIRS."""
    tag = sys.implementation.cache_tag
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        if Path(dirpath).name == "lib-dynload":
            dirnames[:] = []
            continue
        in_cache = Path(dirpath).name == "__pycache__"
        for n in sorted(filenames):
            if (in_cache and n.endswith(f".{tag}.pyc")) or (not in_cache and n.endswith(".py")):
                yield Path(dirpath, n)


def ldd(path: Path) -> tuple[dict[str, Path], Path | None]:
    """The shared libraries ``path`` links (soname -> host file) and its loader (None: static or not ELF)."""
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    libs: dict[str, Path] = {}
    loader = None
    for line in proc.stdout.splitlines():
        if m := _LDD_LINE.match(line):
            libs[m[1]] = Path(m[2])
        elif m := _LOADER_LINE.match(line):
            loader = Path(m[1])
        elif "=> not found" in line:
            libs[line.split()[0]] = Path("/nonexistent")
    return libs, loader


def _extensions(stdlib: Path) -> Iterator[Path]:
    dyn = stdlib / "lib-dynload"
    if dyn.is_dir():
        yield from sorted(p for p in dyn.iterdir() if p.name.endswith(".so"))


def _own_lib(name: str) -> bool:
    return name.startswith("libpython")


def _plan(python: Path, stdlib: Path) -> tuple[dict[str, Path], list[str]]:
    """(guest path relative to the image -> host file, names of extension modules left out)."""
    libs, loader = ldd(python)
    if loader is None:
        raise BackendError(f"{python} is not a dynamically linked ELF program: cannot pack it for microVM guests")
    files: dict[str, Path] = {"bin/python3": python, "lib/ld-linux-x86-64.so.2": loader}
    left_out: list[str] = []
    for ext in _extensions(stdlib):
        ext_libs, _ = ldd(ext)
        if any(n not in KEEP_LIBS and not _own_lib(n) and not n.startswith("ld-linux") for n in ext_libs):
            left_out.append(ext.name)
            continue
        libs.update(ext_libs)
        files[f"lib/{stdlib.name}/lib-dynload/{ext.name}"] = ext
    for soname, host in libs.items():
        if not host.is_file():
            raise BackendError(f"{python} links {soname}, which the host cannot resolve (ldd: not found)")
        files[f"lib/{soname}"] = host
    for f in _stdlib_files(stdlib):
        files[f"lib/{stdlib.name}/{f.relative_to(stdlib)}"] = f
    return files, left_out


def _key(python: Path, stdlib: Path) -> str:
    """Names the image without running ldd (~70 processes, seconds under load): the interpreter, every file of its
    standard library (path, size, mtime) and the loader cache, which ldconfig rewrites whenever the host's
    libraries change."""
    h = hashlib.sha256(f"recipe={RECIPE}\n".encode())
    inputs = [python, Path("/etc/ld.so.cache"), *_stdlib_files(stdlib), *_extensions(stdlib)]
    for f in inputs:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def write_tree(python: Path, stdlib: Path, tree: Path) -> Path:
    """The runtime's files under ``tree`` (the image's content; tests run it in a chroot). Returns ``tree``."""
    files, _ = _plan(python, stdlib)
    for guest, host in files.items():
        dest = tree / guest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(host, dest)  # mtimes kept: a .pyc is valid only next to its source's mtime
        os.chmod(dest, 0o755 if guest.startswith("bin/") or guest.endswith(".so") or ".so." in guest else 0o644)
    for d, _, _ in os.walk(tree):
        os.chmod(d, 0o755)  # noqa: S103 - a read-only image of public files, readable by the guest's users
    return tree


def ensure_runtime(cache: Path, python: Path | None = None) -> Path:
    """``cache/runtime/<hash>.ext4``, the read-only runtime disk of ``python`` (default: the daemon's own)."""
    python = python or interpreter()
    stdlib = stdlib_dir() if python == interpreter() else _stdlib_of(python)
    path = cache / "runtime" / f"{_key(python, stdlib)}.ext4"
    if path.is_file():
        return path
    with _tmpdir(cache / "runtime", ".build-") as tmp:
        tree = write_tree(python, stdlib, tmp / "rt")
        size_mb = _tree_bytes(tree) * 12 // 10 // (1 << 20) + 16
        img = tmp / "rt.ext4"
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        _run(["mkfs.ext4", "-q", "-F", "-L", "bbrt", "-O", "^has_journal", "-E", "root_owner=0:0",
              "-d", str(tree), str(img)], what="making the agent runtime image")  # fmt: skip
        os.chmod(img, 0o444)
        img.rename(path)
    return path


def _stdlib_of(python: Path) -> Path:
    """The standard library of another interpreter (asks it)."""
    out = subprocess.run([str(python), "-I", "-S", "-c", "import sysconfig;print(sysconfig.get_path('stdlib'))"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        raise BackendError(f"{python} does not run: {out.stderr.strip()[-500:]}")
    return Path(out.stdout.strip())


def agent_argv(entry: str) -> list[str]:
    """How the guest's shim starts the agent module ``bbagent.<entry>`` on this runtime (for the docs and tests;
    guest/shim.sh spells the same command)."""
    rt = GUEST_DIR
    code = f"import sys;sys.path[:0]=['/.branchbox'];from bbagent.{entry} import main;main()"
    return [f"{rt}/lib/ld-linux-x86-64.so.2", "--library-path", f"{rt}/lib", f"{rt}/bin/python3", "-I", "-S", "-B",
            "-c", code]  # fmt: skip
