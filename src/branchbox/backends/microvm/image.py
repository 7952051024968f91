"""Guest images: the kernel (Debian's cloud kernel), the initrd (busybox-static + virtio modules + the agent) and
one ext4 root image per template. Everything is built once and cached under ``DATA/vm``; builds are atomic
(temp name + rename) so concurrent daemons and crashes never see half a file.

```
DATA/vm/kernel/<release>/vmlinux         ELF kernel (boots via PVH), from the package's LZ4 bzImage
DATA/vm/kernel/<release>/modules/*.ko    the virtio/vsock modules and what they depend on
DATA/vm/initrd/<hash>.cpio               newc archive; the hash covers kernel release, init and agent code
DATA/vm/images/<template digest>.ext4    the template's rootfs with ownership shifted back (uid 0 = root)
```
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from branchbox import agent
from branchbox.backends.base import IdMap
from branchbox.errors import BackendError

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# loaded in this order by the initrd's init (dependencies are resolved from each module's modinfo)
MODULES = ("virtio_mmio", "virtio_blk", "virtio_console")
VSOCK_MODULES = ("vmw_vsock_virtio_transport",)
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


@dataclass(frozen=True, slots=True)
class GuestImages:
    kernel: Path
    initrd: Path
    release: str


def _run(argv: list[str], *, cwd: Path | None = None, what: str) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise BackendError(f"{what}: {argv[0]} is missing; install it (make apt)") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise BackendError(f"{what} failed ({' '.join(argv[:3])} ...): {err}")
    return proc


@contextlib.contextmanager
def _tmpdir(parent: Path, prefix: str) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- kernel
def _apt_download(package: str, dest: Path) -> Path:
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package], cwd=dest,
         what=f"downloading {package}")  # fmt: skip
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise BackendError(f"apt-get download {package} left no .deb in {dest}")
    return debs[-1]


def _versioned_package(meta_deb: Path) -> str:
    depends = _run(["dpkg-deb", "-f", str(meta_deb), "Depends"], what="reading the kernel package").stdout.decode()
    for dep in depends.split(","):
        name = dep.strip().split()[0] if dep.strip() else ""
        if name.startswith("linux-image-"):
            return name
    raise BackendError(f"{meta_deb.name} depends on no linux-image package: {depends!r}")


def decompress_vmlinuz(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage compressed with LZ4 (Debian's default since 6.x)."""
    pos = vmlinuz.find(LZ4_LEGACY_MAGIC)
    if pos < 0:
        raise BackendError("the kernel image has no LZ4 payload: only LZ4-compressed bzImages are supported")
    proc = subprocess.run(["lz4", "-dc"], input=vmlinuz[pos:], capture_output=True, check=False)
    if not proc.stdout.startswith(b"\x7fELF"):  # lz4 exits 1 on the bzImage's trailing bytes; the ELF is whole
        raise BackendError(f"decompressing the kernel failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return proc.stdout


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` field of a module's .modinfo section."""
    i = ko.find(b"\0depends=")
    if i < 0:
        return []
    raw = ko[i + 9 : ko.index(b"\0", i + 1)].decode()
    return [d for d in raw.split(",") if d]


def _index_modules(tree: Path) -> dict[str, Path]:
    return {p.name.removesuffix(".ko").replace("-", "_"): p for p in tree.rglob("*.ko")}


def module_order(wanted: tuple[str, ...], index: dict[str, Path]) -> list[str]:
    """``wanted`` and their dependencies, dependencies first."""
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in stack:
            raise BackendError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        path = index.get(name)
        if path is None:
            return  # built into the kernel
        for dep in module_depends(path.read_bytes()):
            visit(dep.replace("-", "_"), (*stack, name))
        order.append(name)

    for name in wanted:
        if name not in index:
            raise BackendError(f"kernel module {name} is not in the kernel package")
        visit(name, ())
    return order


def ensure_kernel(cache: Path) -> Path:
    """``cache/kernel/<release>`` with ``vmlinux`` and ``modules/`` (downloaded with apt-get once)."""
    root = cache / "kernel"
    current = root / "current"
    if (current / "vmlinux").is_file():
        return current.resolve()
    with _tmpdir(root, ".build-") as tmp:
        meta = _apt_download(KERNEL_PACKAGE, tmp)
        deb = _apt_download(_versioned_package(meta), tmp)
        tree = tmp / "x"
        _run(["dpkg-deb", "-x", str(deb), str(tree)], what="unpacking the kernel package")
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise BackendError(f"{deb.name} contains no /boot/vmlinuz-*")
        release = vmlinuz[-1].name.removeprefix("vmlinuz-")
        out = tmp / release
        (out / "modules").mkdir(parents=True)
        (out / "vmlinux").write_bytes(decompress_vmlinuz(vmlinuz[-1].read_bytes()))
        index = _index_modules(tree / "lib" / "modules" / release)
        for name in module_order(MODULES + VSOCK_MODULES, index):
            shutil.copyfile(index[name], out / "modules" / f"{name}.ko")
        final = root / release
        if not final.exists():
            out.rename(final)
        tmp_link = root / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        tmp_link.symlink_to(release)
        tmp_link.rename(current)
    return current.resolve()


# ---------------------------------------------------------------------------------------------------- initrd
def _newc(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def _agent_files() -> dict[str, bytes]:
    pkg = resources.files("branchbox.agent")
    return {n: pkg.joinpath(n).read_bytes() for n in agent.FILES}


def _guest_file(name: str) -> bytes:
    return resources.files("branchbox.backends.microvm").joinpath("guest", name).read_bytes()


def ensure_initrd(cache: Path, kernel_dir: Path, *, vsock: bool = False) -> Path:
    """The initrd for ``kernel_dir``: busybox, init, shim, modules (load order in ``/modules/order``), agent."""
    modules = module_order(MODULES + (VSOCK_MODULES if vsock else ()), _index_modules(kernel_dir / "modules"))
    files: dict[str, tuple[int, bytes]] = {
        "init": (0o100755, _guest_file("init.sh")),
        "shim": (0o100755, _guest_file("shim.sh")),
        "bin/busybox": (0o100755, BUSYBOX.read_bytes()),
        "modules/order": (0o100644, "".join(f"{m}\n" for m in modules).encode()),
    }
    for m in modules:
        files[f"modules/{m}.ko"] = (0o100644, (kernel_dir / "modules" / f"{m}.ko").read_bytes())
    for name, data in _agent_files().items():
        files[f"bbagent/{name}"] = (0o100644, data)
    h = hashlib.sha256(kernel_dir.name.encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name][1]).digest())
    path = cache / "initrd" / f"{h.hexdigest()[:24]}.cpio"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    out = bytearray()
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules", "bbagent"):
        out += _newc(d, 0o040755, ino=ino)
        ino += 1
    out += _newc("dev/console", 0o020600, rdev=(5, 1), ino=ino)
    ino += 1
    for name in sorted(files):
        mode, data = files[name]
        out += _newc(name, mode, data, ino=ino)
        ino += 1
    out += _newc("TRAILER!!!", 0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(bytes(out))
    tmp.rename(path)
    return path


def ensure_guest(cache: Path, *, vsock: bool = False) -> GuestImages:
    kdir = ensure_kernel(cache)
    return GuestImages(kernel=kdir / "vmlinux", initrd=ensure_initrd(cache, kdir, vsock=vsock), release=kdir.name)


# ---------------------------------------------------------------------------------------------------- rootfs
def _unshift_tree(root: Path, idmap: IdMap) -> None:
    """Ownership back from the container range (host 100000 + n) to the guest's own ids (n)."""
    lo, hi = idmap.host_base, idmap.host_base + idmap.count

    def back(v: int) -> int:
        return v - lo if lo <= v < hi else v

    for dirpath, dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in (*dirnames, *filenames))):
            st = os.lstat(name)
            uid, gid = back(st.st_uid), back(st.st_gid)
            if (uid, gid) != (st.st_uid, st.st_gid):
                os.lchown(name, uid, gid)
                if not os.path.islink(name) and st.st_mode & 0o6000:
                    os.chmod(name, st.st_mode & 0o7777)  # chown cleared setuid/setgid


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def ensure_rootfs(cache: Path, digest: str, tree: Path, idmap: IdMap, *, free_mb: int = 1024) -> Path:
    """``cache/images/<digest>.ext4``: the template tree (ownership shifted back), ``free_mb`` MiB to spare."""
    path = cache / "images" / f"{digest}.ext4"
    if path.is_file():
        return path
    with _tmpdir(cache / "images", f".{digest[:12]}-") as tmp:
        copy = tmp / "root"
        _run(["cp", "-a", "--reflink=auto", f"{tree}/.", str(copy)], what="copying the template tree")
        _unshift_tree(copy, idmap)
        (copy / ".branchbox").mkdir(mode=0o755, exist_ok=True)
        size_mb = _tree_bytes(copy) * 13 // 10 // (1 << 20) + free_mb
        img = tmp / "root.ext4"
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        _run(["mkfs.ext4", "-q", "-F", "-L", "bbroot", "-O", "^has_journal", "-E", "root_owner=0:0",
              "-d", str(copy), str(img)], what="making the ext4 root image")  # fmt: skip
        os.chmod(img, 0o444)
        img.rename(path)
    return path


def create_overlay(base: Path, dest: Path, *, base_format: str = "raw") -> None:
    """A copy-on-write qcow2 overlay ``dest`` on ``base`` (~7 ms)."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(dest)],
         what="creating the VM's disk overlay")  # fmt: skip
