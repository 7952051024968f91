"""Content-addressed template cache.

Layout under ``root``::

    <digest>/rootfs          immutable rootfs, owners shifted by idmap.host_base
    <digest>/template.json   metadata (name, python, env, workdir, spec, sizes)
    names/<name>             symlink -> ../<digest>, replaced atomically
    locks/<digest>.lock      flock: one build per digest at a time
    .gc.lock                 builds hold it shared; stale .tmp-* dirs are removed only under an exclusive lock
    .tmp-<random>/           a build or import in progress (renamed to <digest> when complete)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from branchbox.backends.base import IdMap
from branchbox.errors import TemplateNotFoundError, TemplateSpecError
from branchbox.images.build import BuildEvent, Progress, build_rootfs
from branchbox.images.importer import (
    DEFAULT_PYTHON,
    check_rootfs,
    default_python,
    extract_rootfs,
    has_shell,
    python_version_from_name,
    resolve_in_root,
)
from branchbox.images.oci_fetch import FetchOptions, fetch, parse_ref
from branchbox.images.oci_import import OCI_IMPORTER_VERSION, template_digest, unpack_image
from branchbox.images.oci_layout import defaults, read_image
from branchbox.images.oci_unpack import Budget
from branchbox.images.shift import shift_id
from branchbox.images.spec import BUILDER_VERSION, TemplateSpec, check_name, default_spec, is_digest
from branchbox.models import TemplateInfo

_DEFAULT_IDMAP = IdMap()
_META = "template.json"


def _emit(progress: Progress | None, step: str, message: str, fraction: float | None = None) -> None:
    if progress is not None:
        progress(BuildEvent(step, message, fraction))


def disk_usage(root: Path) -> int:
    """Bytes allocated by the tree (hard links counted once)."""
    total = 0
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class TemplateStore:
    """Templates on disk, addressed by digest, with names pointing at digests."""

    def __init__(self, root: Path, idmap: IdMap = _DEFAULT_IDMAP) -> None:
        self.root = Path(root)
        self.idmap = idmap
        self._names = self.root / "names"
        self._locks = self.root / "locks"
        # template.json of a digest never changes (content-addressed); resolve() checks the template still exists
        self._meta_cache: dict[str, dict[str, Any]] = {}

    # ---- lookups ----

    def _ensure_dirs(self) -> None:
        for d in (self.root, self._names, self._locks):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)

    def _digest_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if is_digest(p.name) and (p / _META).is_file())

    def _name_target(self, name: str) -> str | None:
        try:
            target = os.path.basename(os.readlink(f"{self._names}/{name}"))
        except OSError:
            return None
        return target if os.path.isfile(f"{self.root}/{target}/{_META}") else None

    def _names_by_digest(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if self._names.is_dir():
            for link in sorted(self._names.iterdir()):
                if link.name.startswith("."):
                    continue
                digest = self._name_target(link.name)
                if digest is not None:
                    out.setdefault(digest, []).append(link.name)
        return out

    def _not_found(self, what: str) -> TemplateNotFoundError:
        hint = (
            "build it with TemplateStore.ensure_default() (CLI: `branchbox template build default`)"
            if what == "default"
            else "build it from a spec (TemplateStore.build / `branchbox template build SPEC.toml`) or "
            "import a rootfs tar (TemplateStore.import_tar / "
            f"`branchbox template import ROOTFS.tar --name {what}`)"
        )
        # the store's host path stays out: this message reaches API callers (`branchbox template ls` lists them)
        return TemplateNotFoundError(
            f"template {what!r} does not exist in this daemon's template store: {hint}", template=what
        )

    def resolve(self, name_or_digest: str) -> str:
        """The digest a name (or digest, or unique digest prefix of 12+ characters) refers to."""
        return self._resolve(name_or_digest)[0]

    def _resolve(self, name_or_digest: str) -> tuple[str, bool]:
        """(digest, True when ``name_or_digest`` is a name)."""
        if is_digest(name_or_digest) and os.path.isfile(f"{self.root}/{name_or_digest}/{_META}"):
            return name_or_digest, False
        if "/" not in name_or_digest and name_or_digest not in ("", ".", ".."):
            digest = self._name_target(name_or_digest)
            if digest is not None:
                return digest, True
        if len(name_or_digest) >= 12 and all(c in "0123456789abcdef" for c in name_or_digest):
            matches = [d for d in self._digest_dirs() if d.startswith(name_or_digest)]
            if len(matches) == 1:
                return matches[0], False
        raise self._not_found(name_or_digest)

    def _meta(self, digest: str) -> dict[str, Any]:
        cached = self._meta_cache.get(digest)
        if cached is not None:
            return cached
        try:
            data: dict[str, Any] = json.loads((self.root / digest / _META).read_text())
        except FileNotFoundError:
            raise self._not_found(digest) from None
        self._meta_cache[digest] = data
        return data

    def _info(self, digest: str, name: str) -> TemplateInfo:
        meta = self._meta(digest)
        return TemplateInfo(
            name=name,
            digest=digest,
            created_at=float(meta["created_at"]),
            size_bytes=int(meta["size_bytes"]),
            python=meta.get("python"),
            env=dict(meta.get("env", {})),
            workdir=str(meta.get("workdir", "/")),
            source=str(meta.get("source", "spec")),
            user=str(meta.get("user") or "root"),
        )

    def get(self, name_or_digest: str) -> TemplateInfo:
        """Metadata of a template; TemplateNotFoundError says how to build it."""
        digest, by_name = self._resolve(name_or_digest)
        if not by_name:
            names = self._names_by_digest().get(digest, [])
            return self._info(digest, names[0] if names else digest)
        return self._info(digest, name_or_digest)

    def metadata(self, name_or_digest: str) -> dict[str, Any]:
        """The full template.json (spec, user, python_version, build time, ...)."""
        return copy.deepcopy(self._meta(self.resolve(name_or_digest)))

    def rootfs(self, name_or_digest: str) -> Path:
        """Host path of the template's immutable rootfs (an overlay lower layer)."""
        return self.root / self.resolve(name_or_digest) / "rootfs"

    def list(self) -> list[TemplateInfo]:
        """One entry per name, plus unnamed templates listed under their digest."""
        by_digest = self._names_by_digest()
        out = [self._info(d, n) for d, names in by_digest.items() for n in names]
        out += [self._info(d, d) for d in self._digest_dirs() if d not in by_digest]
        return sorted(out, key=lambda t: t.name)

    # ---- names and locks ----

    def _set_name(self, name: str, digest: str) -> None:
        tmp = self._names / f".{name}.{secrets.token_hex(4)}"
        os.symlink(f"../{digest}", tmp)
        os.replace(tmp, self._names / name)

    @contextlib.asynccontextmanager
    async def _flock(self, path: Path, op: int) -> AsyncIterator[int]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            await asyncio.to_thread(fcntl.flock, fd, op)
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _flock_sync(self, path: Path, op: int) -> Iterator[int]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, op)
            yield fd
        finally:
            os.close(fd)

    def _clean_stale_tmp(self) -> None:
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def _gc_shared(self) -> AsyncIterator[None]:
        """Hold the gc lock shared (cleaning stale temp dirs first when nobody builds): our .tmp-* dirs live."""
        self._ensure_dirs()
        gc = self.root / ".gc.lock"
        fd = os.open(gc, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_SH)
            else:
                await asyncio.to_thread(self._clean_stale_tmp)
                fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _building(self, digest: str) -> AsyncIterator[None]:
        """Hold the gc lock shared and the digest lock."""
        async with self._gc_shared(), self._flock(self._locks / f"{digest}.lock", fcntl.LOCK_EX):
            yield

    def _new_tmp(self) -> Path:
        tmp = self.root / f".tmp-{secrets.token_hex(8)}"
        tmp.mkdir(mode=0o755)
        return tmp

    def _commit(self, tmp: Path, digest: str, meta: dict[str, Any]) -> None:
        """Write template.json, make the top read-only, and rename the temp dir into place."""
        meta_path = tmp / _META
        with meta_path.open("w") as fh:
            json.dump(meta, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        meta_path.chmod(0o444)
        tmp.chmod(0o555)
        final = self.root / digest
        if final.exists():  # force rebuild: swap the old one out, then delete it
            old = self.root / f".tmp-old-{secrets.token_hex(8)}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # ---- build, import, remove ----

    async def build(self, spec: TemplateSpec, *, progress: Progress | None = None, force: bool = False) -> TemplateInfo:
        """Build ``spec`` (or return the cached template with the same digest) and point its name at it."""
        digest = spec.digest()
        if not force and (self.root / digest / _META).is_file():
            self._ensure_dirs()
            self._set_name(spec.name, digest)
            _emit(progress, "cached", f"template {spec.name} is cached ({digest[:12]})", 1.0)
            return self._info(digest, spec.name)
        async with self._building(digest):
            if not force and (self.root / digest / _META).is_file():  # built by someone else meanwhile
                self._set_name(spec.name, digest)
                _emit(progress, "cached", f"template {spec.name} was built concurrently ({digest[:12]})", 1.0)
                return self._info(digest, spec.name)
            tmp = self._new_tmp()
            try:
                t0 = time.monotonic()
                python_version = await build_rootfs(spec, tmp / "rootfs", idmap=self.idmap, progress=progress)
                size = await asyncio.to_thread(disk_usage, tmp / "rootfs")
                meta = {
                    "name": spec.name,
                    "digest": digest,
                    "source": "spec",
                    "created_at": time.time(),
                    "build_seconds": round(time.monotonic() - t0, 3),
                    "size_bytes": size,
                    "python": spec.python if python_version else None,  # a spec's image may have none
                    "python_version": python_version,
                    "env": dict(spec.env),
                    "workdir": spec.workdir,
                    "user": spec.user,
                    "idmap": {"host_base": self.idmap.host_base, "count": self.idmap.count},
                    "builder_version": BUILDER_VERSION,
                    "spec": spec.canonical(),
                }
                await asyncio.to_thread(self._commit, tmp, digest, meta)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            self._set_name(spec.name, digest)
        _emit(progress, "done", f"built {spec.name} ({digest[:12]}, {size / 1e6:.0f} MB)", 1.0)
        return self._info(digest, spec.name)

    async def import_tar(
        self,
        path: Path,
        *,
        name: str,
        progress: Progress | None = None,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str = "/",
    ) -> TemplateInfo:
        """Import a rootfs tarball (plain, gz, bz2, xz or zst). The image needs no Python and no shell (see
        ``check_rootfs``); ``python``, when given, is the image's interpreter (checked and recorded). The digest is
        the tar's sha256 (mixed with ``python``/``env``/``workdir`` when those are not the defaults)."""
        check_name(name)
        path = Path(path)
        if not path.is_file():
            raise TemplateSpecError(f"cannot import {str(path)!r}: not a file; pass the path of a rootfs tarball")
        spec_check = TemplateSpec(name=name, python=python or "/usr/bin/python3", env=dict(env or {}), workdir=workdir)
        _emit(progress, "hash", f"sha256 of {path}")
        digest = await asyncio.to_thread(_sha256_file, path)
        tar_sha = digest
        options = {"python": python, "env": dict(sorted(spec_check.env.items())), "workdir": workdir}
        if python is not None or spec_check.env or workdir != "/":
            blob = json.dumps({"tar": tar_sha, **options}, sort_keys=True).encode()
            digest = hashlib.sha256(blob).hexdigest()
        if (self.root / digest / _META).is_file():
            self._ensure_dirs()
            self._set_name(name, digest)
            _emit(progress, "cached", f"{path.name} was imported before ({digest[:12]})", 1.0)
            return self._info(digest, name)
        async with self._building(digest):
            if not (self.root / digest / _META).is_file():
                tmp = self._new_tmp()
                try:
                    rootfs = tmp / "rootfs"
                    rootfs.mkdir(mode=0o755)
                    _emit(progress, "extract", f"extracting {path.name}")
                    skipped = await asyncio.to_thread(extract_rootfs, path, rootfs, self.idmap)
                    if skipped:
                        _emit(progress, "extract", f"skipped {skipped} device node(s)")
                    _emit(progress, "check", f"checking the rootfs{f' and {python}' if python else ''}")
                    py = check_rootfs(rootfs, python) or default_python(rootfs)
                    if not has_shell(rootfs):
                        _emit(progress, "check", "no /bin/sh in the image: run commands as argv lists")
                    wd = resolve_in_root(rootfs, workdir)
                    if not wd.exists():
                        wd.mkdir(mode=0o755, parents=True)
                        os.lchown(wd, shift_id(0, self.idmap), shift_id(0, self.idmap))
                    meta = {
                        "name": name,
                        "digest": digest,
                        "source": "import",
                        "created_at": time.time(),
                        "size_bytes": await asyncio.to_thread(disk_usage, rootfs),
                        "python": python or (DEFAULT_PYTHON if py else None),
                        "python_version": python_version_from_name(py.resolve()) if py else "",
                        "shell": has_shell(rootfs),
                        "env": options["env"],
                        "workdir": workdir,
                        "user": "root",
                        "idmap": {"host_base": self.idmap.host_base, "count": self.idmap.count},
                        "builder_version": BUILDER_VERSION,
                        "tar_sha256": tar_sha,
                    }
                    await asyncio.to_thread(self._commit, tmp, digest, meta)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
            self._set_name(name, digest)
        _emit(progress, "done", f"imported {name} ({digest[:12]})", 1.0)
        return self._info(digest, name)

    async def import_image(
        self,
        ref: str,
        *,
        name: str,
        progress: Progress | None = None,
        options: FetchOptions | None = None,
        budget: Budget | None = None,
        cwd: Path | None = None,
    ) -> TemplateInfo:
        """Import a container image (skopeo's transport syntax: docker://, docker-daemon:, docker-archive:,
        oci-archive:, oci:) as template ``name``. The digest is the image's manifest digest (+ importer version
        and id range); layers are unpacked once into ``layers/`` and shared (docs/templates.md)."""
        check_name(name)
        image_ref = parse_ref(ref, cwd=cwd)
        async with self._gc_shared():
            tmp = self._new_tmp()
            try:
                _emit(progress, "fetch", f"copying {str(image_ref)[:200]} (skopeo)")
                layout, blobs = tmp / "layout", self.root / "blobs"
                await fetch(
                    image_ref, layout, blobs, options or FetchOptions(), lambda ln: _emit(progress, "fetch", ln)
                )
                image = await asyncio.to_thread(read_image, layout, blobs, ref_name="image")
                digest = template_digest(image, self.idmap)
                async with self._flock(self._locks / f"{digest}.lock", fcntl.LOCK_EX):
                    if (self.root / digest / _META).is_file():
                        self._set_name(name, digest)
                        _emit(
                            progress, "cached", f"{image.manifest_digest[:19]} was imported before ({digest[:12]})", 1
                        )
                        return self._info(digest, name)
                    budget = budget or Budget()
                    work = asyncio.ensure_future(asyncio.to_thread(self._unpack_image, image, tmp, budget, progress))
                    try:
                        meta = await asyncio.shield(work)
                    except asyncio.CancelledError:  # stop the thread before the temp dir goes
                        budget.cancelled = True
                        with contextlib.suppress(BaseException):
                            await work
                        raise
                    meta.update(name=name, digest=digest, image={**meta["image"], "reference": str(image_ref)[:1024]})
                    await asyncio.to_thread(self._commit, tmp, digest, meta)
                    self._set_name(name, digest)
            finally:
                if tmp.exists():
                    await asyncio.to_thread(shutil.rmtree, tmp, True)
        _emit(progress, "done", f"imported {name} ({digest[:12]}, {meta['size_bytes'] / 1e6:.0f} MB)", 1.0)
        return self._info(digest, name)

    def _unpack_image(self, image: Any, tmp: Path, budget: Budget, progress: Progress | None) -> dict[str, Any]:
        """The rootfs of ``image`` in ``tmp/rootfs`` (through the layer cache) and its template.json fields."""
        t0 = time.monotonic()
        rootfs = tmp / "rootfs"
        counts = unpack_image(
            image,
            blobs=self.root / "blobs",
            stacks=self.root / "layers",
            locks=self._locks,
            work=tmp,
            dest=rootfs,
            idmap=self.idmap,
            budget=budget,
            say=lambda step, msg, frac: _emit(progress, step, msg, frac),
        )
        for p in tmp.iterdir():  # the layout, the auth file: only rootfs and template.json are kept
            if p.name != "rootfs":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        d = defaults(image.config)
        wd = resolve_in_root(rootfs, d["workdir"])
        for missing in reversed([wd, *wd.parents][: len(wd.relative_to(rootfs).parts)]):
            if not missing.exists():  # owned by root inside, like the image's own directories
                missing.mkdir(mode=0o755)
                os.lchown(missing, shift_id(0, self.idmap), shift_id(0, self.idmap))
        py = default_python(rootfs)
        return {
            "source": "image",
            "created_at": time.time(),
            "build_seconds": round(time.monotonic() - t0, 3),
            "size_bytes": disk_usage(rootfs),
            "python": DEFAULT_PYTHON if py else None,
            "python_version": python_version_from_name(py.resolve()) if py else "",
            "shell": has_shell(rootfs),
            "env": d["env"],
            "workdir": d["workdir"],
            "user": d["user"],
            "entrypoint": d["entrypoint"],
            "cmd": d["cmd"],
            "idmap": {"host_base": self.idmap.host_base, "count": self.idmap.count},
            "builder_version": BUILDER_VERSION,
            "image": {
                "manifest_digest": image.manifest_digest,
                "config_digest": image.config_digest,
                "platform": f"{image.os}/{image.architecture}",
                "layers": [{"digest": x.digest, "diff_id": x.diff_id, "size": x.size} for x in image.layers],
                "importer_version": OCI_IMPORTER_VERSION,
                **counts,
            },
        }

    async def commit_tree(
        self, digest: str, *, name: str, fill: Callable[[Path], None], meta: Mapping[str, Any]
    ) -> TemplateInfo:
        """A template made by ``fill(rootfs)`` (a tree already in the sandbox uid range) under ``digest``, with
        ``meta`` in its template.json; returns at once when ``digest`` exists (the name is pointed at it)."""
        check_name(name)
        self._ensure_dirs()
        async with self._building(digest):
            if not (self.root / digest / _META).is_file():
                tmp = self._new_tmp()
                try:
                    rootfs = tmp / "rootfs"
                    await asyncio.to_thread(fill, rootfs)
                    full = {
                        "python": "/usr/bin/python3",
                        "env": {},
                        "workdir": "/",
                        "user": "root",
                        **meta,
                        "name": name,
                        "digest": digest,
                        "created_at": time.time(),
                        "size_bytes": await asyncio.to_thread(disk_usage, rootfs),
                        "idmap": {"host_base": self.idmap.host_base, "count": self.idmap.count},
                        "builder_version": BUILDER_VERSION,
                    }
                    await asyncio.to_thread(self._commit, tmp, digest, full)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
            self._set_name(name, digest)
        return self._info(digest, name)

    def remove(self, name: str) -> None:
        """Remove a name; the template itself goes when no name points at it (a digest removes all its names).

        Callers (the Manager) must make sure no sandbox still uses the template.
        """
        digest = self.resolve(name)
        self._ensure_dirs()
        with self._flock_sync(self._locks / f"{digest}.lock", fcntl.LOCK_EX):
            names = self._names_by_digest().get(digest, [])
            drop = names if name not in names else [name]
            for n in drop:
                (self._names / n).unlink(missing_ok=True)
            if set(names) - set(drop):
                return
            final = self.root / digest
            if final.exists():
                doomed = self.root / f".tmp-rm-{secrets.token_hex(8)}"
                os.rename(final, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    async def ensure_default(self, progress: Progress | None = None) -> TemplateInfo:
        """Build the bundled default template unless it is cached."""
        return await self.build(default_spec(), progress=progress)
