"""Templates from Dockerfiles: every step that changes files runs in a branchbox sandbox, never as host root.

A build walks the Dockerfile's instructions on one stage (FROM names a branchbox template). Each instruction
gets a cache key: sha256 of the previous key, the instruction after substitution, and what it depends on (RUN:
its environment, user, workdir and shell; COPY/ADD: the copied files' names, modes and contents). A step that
changes files (RUN, COPY, ADD, WORKDIR) runs in a sandbox booted on the previous step's layers; its files are
then captured (a snapshot of the sandbox, whose layers are kept under the pin ``build:<key>`` and recorded in
``DATA/build-cache/<key>.json``: layers belong to one daemon's data dir) and the snapshot record dropped. A
rebuild finds the keys of unchanged steps and reports them ``CACHED``; the first changed step boots a sandbox on
the last cached layers and runs from there. The template is the flattening of the base template's rootfs and
the last layers (whiteouts applied), committed to the template store under a digest derived from the last key
(so an unchanged Dockerfile and context give the same template at once). The sandbox is destroyed however the
build ends; a failed build commits nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import posixpath
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from branchbox.errors import (
    BranchboxError,
    FileNotFoundInSandboxError,
    TemplateBuildError,
    TemplateNotFoundError,
    TemplateSpecError,
)
from branchbox.images.dockerfile_context import (
    DOCKERFILE_MEMBER,
    Context,
    Source,
    normalise_source,
    repack_archive,
)
from branchbox.images.dockerfile_parse import Instruction, expand, expand_words, key_values, parse
from branchbox.images.oci_fetch import TRANSPORTS, FetchOptions, parse_ref
from branchbox.images.shift import rebase_tree
from branchbox.images.spec import check_name
from branchbox.images.store import TemplateStore
from branchbox.models import ArchiveResult, ExecResult, FileEntry, SandboxInfo, SnapshotInfo, TemplateInfo
from branchbox.storage.flatten import flatten_into, is_whiteout
from branchbox.storage.fsutil import OPAQUE_XATTR

BUILD_VERSION = 1  # bump when a step's result for the same key changes
TAIL_LINES = 40
_CHUNK = 1 << 20
_FS_STEPS = frozenset({"RUN", "COPY", "ADD", "WORKDIR"})
_METADATA = frozenset({"ENV", "ARG", "LABEL", "USER", "CMD", "ENTRYPOINT", "EXPOSE", "SHELL", "STOPSIGNAL",
                       "VOLUME", "HEALTHCHECK", "MAINTAINER"})  # fmt: skip
_REFUSED = {
    "ONBUILD": "ONBUILD triggers are not supported: put the steps in the Dockerfile that uses the template",
}
_DEFAULT_SHELL = ["/bin/sh", "-c"]
_BUILD_TIMEOUT_S = 24 * 3600.0  # the build sandbox's own expiry (it is destroyed when the build ends)

Emit = Callable[[dict[str, Any]], None]


class BuildHost(Protocol):
    """What a build needs of the core (the Manager satisfies it): sandboxes on layers, files, snapshots, pins."""

    @property
    def templates(self) -> TemplateStore: ...

    def lower_path(self, layer_id: str) -> Path: ...

    def layer_uid_bases(self, layer_ids: Sequence[str]) -> list[int]: ...

    def pin_layers(self, layers: Sequence[str], owner: str) -> None: ...

    async def create_on_layers(
        self,
        layers: Sequence[str],
        *,
        template: str = ...,
        source: str = ...,
        env: Mapping[str, str] | None = ...,
        timeout: float | None = ...,
    ) -> SandboxInfo: ...

    async def exec(
        self,
        sandbox_id: str,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        user: str | None = ...,
        on_stdout: Callable[[bytes], object] | None = ...,
        on_stderr: Callable[[bytes], object] | None = ...,
        max_output: int | None = ...,
    ) -> ExecResult: ...

    async def upload_archive(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes]) -> ArchiveResult: ...

    async def stat(self, sandbox_id: str, path: str) -> FileEntry: ...

    async def snapshot(self, sandbox_id: str, *, name: str | None = ...) -> SnapshotInfo: ...

    async def delete_snapshot(self, id_or_name: str) -> None: ...

    async def destroy(self, sandbox_id: str) -> None: ...


@dataclass
class _Stage:
    base: TemplateInfo
    key: str
    env: dict[str, str]
    workdir: str
    user: str
    layers: list[str] = field(default_factory=list)
    args: dict[str, str | None] = field(default_factory=dict)
    shell: list[str] = field(default_factory=lambda: list(_DEFAULT_SHELL))
    config: dict[str, Any] = field(default_factory=dict)  # labels, cmd, entrypoint, expose, ... (metadata)

    def scope(self) -> dict[str, str]:
        """Variables for substitution and RUN: ARGs with a value, then ENV (ENV wins, as in Docker)."""
        return {**{k: v for k, v in self.args.items() if v is not None}, **self.env}


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class BuildCache:
    """``DATA/build-cache/<key>.json``: the layer chain (topmost first) a step's key produced."""

    def __init__(self, root: Path, host: BuildHost) -> None:
        self.root = root
        self.host = host

    def get(self, key: str) -> list[str] | None:
        try:
            layers = json.loads((self.root / f"{key}.json").read_text())["layers"]
        except (OSError, ValueError, KeyError):
            return None
        if not all(isinstance(x, str) and self.host.lower_path(x).exists() for x in layers):
            return None
        return list(layers)

    def put(self, key: str, layers: Sequence[str]) -> None:
        self.host.pin_layers(layers, f"build:{key}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.tmp"
        tmp.write_text(json.dumps({"layers": list(layers), "created_at": time.time()}))
        os.replace(tmp, self.root / f"{key}.json")


class DockerfileBuild:
    """One build: ``await DockerfileBuild(host, context, ...).run()`` -> the template's TemplateInfo."""

    def __init__(
        self,
        host: BuildHost,
        context: Context,
        *,
        name: str,
        dockerfile: str = "Dockerfile",
        build_args: Mapping[str, str] | None = None,
        emit: Emit | None = None,
        cache_dir: Path,
        check_image: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        check_name(name)
        self.host = host
        self.ctx = context
        self.name = name
        self.dockerfile = dockerfile
        self.build_args = dict(build_args or {})
        self._emit = emit or (lambda ev: None)
        self.cache = BuildCache(cache_dir, host)
        self.check_image = check_image  # the API's policy for FROM image references (transports, registries)
        self.sandbox: str | None = None
        self._used_args: set[str] = set()

    # ---- the walk ----

    async def run(self) -> TemplateInfo:
        t0 = time.monotonic()
        text = self.ctx.read(normalise_source(self.dockerfile, "dockerfile")).decode("utf-8", "replace")
        instructions = parse(text)
        try:
            stage, steps = await self._from(instructions)
            total = len(steps) + 1
            for n, ins in enumerate(steps, 2):
                self._emit({"type": "step", "step": n, "total": total, "line": ins.line, "instruction": ins.source})
                await self._step(stage, ins, n)
            unused = sorted(set(self.build_args) - self._used_args)
            if unused:
                self._log(f"[warning] build args not consumed by any ARG: {', '.join(unused)}\n")
            info = await self._commit(stage)
        finally:
            await self._drop_sandbox()
        self._emit({"type": "built", "name": info.name, "digest": info.digest,
                    "seconds": round(time.monotonic() - t0, 3)})  # fmt: skip
        return info

    async def _base(self, ref: str, ins: Instruction) -> TemplateInfo:
        """The template FROM names: a template, else an image reference (skopeo's transports; a bare
        ``name:tag`` or ``host/name`` means ``docker://`` as in Docker), imported once as ``image-<hash>``."""
        store = self.host.templates
        with contextlib.suppress(TemplateNotFoundError):
            return store.get(ref)
        if ref.partition(":")[0] in TRANSPORTS:
            image = ref
        elif any(c in ref for c in ":/@"):
            image = "docker://" + ref
        else:
            raise TemplateNotFoundError(
                f"Dockerfile line {ins.line} (FROM): template {ref!r} does not exist: build or import it first "
                "(`branchbox template ls` lists them), or name an image (docker://..., oci:DIR, ...)",
                template=ref,
                line=ins.line,
            )
        auto = "image-" + hashlib.sha256(image.encode()).hexdigest()[:16]
        with contextlib.suppress(TemplateNotFoundError):
            return store.get(auto)  # imported by an earlier build: not fetched again
        try:
            if self.check_image is not None:
                await self.check_image(image)
            image_ref = parse_ref(image)
            # as Docker, a registry on the loopback is spoken to over plain HTTP / without TLS checks
            opts = FetchOptions(tls_verify=not (image_ref.transport == "docker" and _loopback(image_ref.registry)))
            self._log(f"importing {image} as template {auto}\n")
            return await store.import_image(
                image, name=auto, options=opts, progress=lambda ev: self._log(f"{ev.message}\n")
            )
        except BranchboxError as exc:
            details = {**exc.details, "line": ins.line}
            raise type(exc)(f"Dockerfile line {ins.line} (FROM): {exc.message}", **details) from exc

    async def _from(self, instructions: list[Instruction]) -> tuple[_Stage, list[Instruction]]:
        global_args: dict[str, str | None] = {}
        i = 0
        while i < len(instructions) and instructions[i].keyword == "ARG":
            for k, v in key_values(instructions[i], {}, legacy=False):
                global_args[k] = self._arg_value(k, v)
            i += 1
        if i >= len(instructions) or instructions[i].keyword != "FROM":
            at = instructions[i] if i < len(instructions) else None
            raise TemplateSpecError(
                "the Dockerfile must start with FROM (only ARG may come before it)"
                + (f": line {at.line} is {at.keyword}" if at else ": it has no FROM"),
                line=at.line if at else None,
            )
        ins = instructions[i]
        later = [x for x in instructions[i + 1 :] if x.keyword == "FROM"]
        if later:
            raise later[0].error(
                "multi-stage builds are not supported (a second FROM): build each stage as its own template, "
                "or copy the files in from the build context"
            )
        if set(ins.flags) - {"platform"} or "platform" in ins.flags:
            raise ins.error(f"FROM flags are not supported: {', '.join('--' + f for f in ins.flags)}")
        scope = {k: v for k, v in global_args.items() if v is not None}
        words = expand_words(ins.args, scope, escape=ins.escape, where=f"Dockerfile line {ins.line} (FROM)")
        if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
            raise ins.error("expected FROM TEMPLATE [AS NAME]")
        ref = words[0]
        self._emit({"type": "step", "step": 1, "total": len(instructions) - i, "line": ins.line,
                    "instruction": ins.source})  # fmt: skip
        if ref == "scratch":
            raise ins.error("FROM scratch is not supported: start from a template (branchbox template ls)")
        base = await self._base(ref, ins)
        meta = self.host.templates.metadata(base.digest)
        self._cached(True)
        stage = _Stage(
            base=base,
            key=_h("from", BUILD_VERSION, base.digest),
            env=dict(base.env),
            workdir=base.workdir,
            user=str(meta.get("user") or "root"),
        )
        # global ARGs are visible in a stage only when re-declared there (ARG NAME), with their value
        stage.config["global_args"] = global_args
        return stage, instructions[i + 1 :]

    def _arg_value(self, name: str, default: str | None) -> str | None:
        if name in self.build_args:
            self._used_args.add(name)
            return self.build_args[name]
        return default

    async def _step(self, stage: _Stage, ins: Instruction, n: int) -> None:
        kw = ins.keyword
        if kw in _REFUSED:
            raise ins.error(_REFUSED[kw])
        if kw in _METADATA:
            self._metadata(stage, ins)
            stage.key = _h(stage.key, kw, ins.source, stage.scope() if kw in ("ENV", "ARG") else None)
            seen = self.cache.get(stage.key) is not None  # CACHED when an earlier build got this far
            if not seen:
                self.cache.put(stage.key, stage.layers)
            self._cached(seen)
            return
        if kw not in _FS_STEPS:
            raise ins.error(f"unknown instruction {kw}")
        prepared = self._prepare(stage, ins)
        key = _h(stage.key, kw, prepared.cache_part)
        cached = self.cache.get(key)
        if cached is not None:
            await self._drop_sandbox()  # a later step was cached after a miss: continue from its layers
            stage.layers, stage.key = cached, key
            self._after(stage, prepared)
            self._cached(True)
            return
        self._cached(False)
        sid = await self._ensure_sandbox(stage)
        await prepared.run(sid)
        snap = await self.host.snapshot(sid)
        try:
            self.cache.put(key, snap.layers)
        finally:
            await self.host.delete_snapshot(snap.id)
        stage.layers, stage.key = list(snap.layers), key
        self._after(stage, prepared)

    def _after(self, stage: _Stage, prepared: _Prepared) -> None:
        if prepared.workdir is not None:
            stage.workdir = prepared.workdir

    def _cached(self, cached: bool) -> None:
        self._emit({"type": "cached" if cached else "running"})

    def _log(self, text: str) -> None:
        self._emit({"type": "log", "data": text})

    # ---- metadata instructions ----

    def _metadata(self, stage: _Stage, ins: Instruction) -> None:
        kw = ins.keyword
        scope = stage.scope()
        where = f"Dockerfile line {ins.line} ({kw})"
        if kw == "ENV":
            for k, v in key_values(ins, scope, legacy=True):
                stage.env[k] = v or ""
        elif kw == "ARG":
            globals_: dict[str, str | None] = stage.config.get("global_args", {})
            for k, v in key_values(ins, scope, legacy=False):
                default = v if v is not None else globals_.get(k)
                stage.args[k] = self._arg_value(k, default)
        elif kw == "LABEL":
            labels = stage.config.setdefault("labels", {})
            for k, v in key_values(ins, scope, legacy=True):
                labels[k] = v or ""
        elif kw == "MAINTAINER":
            stage.config.setdefault("labels", {})["maintainer"] = ins.args
        elif kw == "USER":
            user = expand(ins.args, scope, escape=ins.escape, where=where).strip()
            if not user:
                raise ins.error("needs a user name or uid")
            stage.user = user
        elif kw in ("CMD", "ENTRYPOINT"):
            stage.config[kw.lower()] = ins.exec_form if ins.exec_form is not None else [*stage.shell, ins.args]
        elif kw == "SHELL":
            if ins.exec_form is None or not ins.exec_form:
                raise ins.error('SHELL needs the JSON form, e.g. SHELL ["/bin/bash", "-c"]')
            stage.shell = list(ins.exec_form)
        elif kw == "EXPOSE":
            stage.config.setdefault("expose", []).extend(expand_words(ins.args, scope, escape=ins.escape,
                                                                      where=where))  # fmt: skip
        elif kw == "VOLUME":
            vols = ins.exec_form or expand_words(ins.args, scope, escape=ins.escape, where=where)
            stage.config.setdefault("volumes", []).extend(vols)
        elif kw == "STOPSIGNAL":
            stage.config["stopsignal"] = expand(ins.args, scope, escape=ins.escape, where=where)
        elif kw == "HEALTHCHECK":
            stage.config["healthcheck"] = ins.args

    # ---- steps that change files ----

    def _prepare(self, stage: _Stage, ins: Instruction) -> _Prepared:
        kw = ins.keyword
        where = f"Dockerfile line {ins.line} ({kw})"
        if kw == "RUN":
            unknown = set(ins.flags)
            if unknown:
                raise ins.error(f"RUN flags are not supported: {', '.join('--' + f for f in sorted(unknown))}")
            argv = ins.exec_form if ins.exec_form is not None else [*stage.shell, ins.args]
            env = stage.scope()
            part = {"argv": argv, "env": env, "user": stage.user, "workdir": stage.workdir}
            return _Prepared(part, lambda sid: self._run(stage, ins, sid, argv, env))
        if kw == "WORKDIR":
            path = expand(ins.args, stage.scope(), escape=ins.escape, where=where).strip()
            if not path:
                raise ins.error("needs a path")
            workdir = posixpath.normpath(posixpath.join(stage.workdir, path))
            return _Prepared({"workdir": workdir}, lambda sid: self._mkdir(sid, workdir, ins), workdir=workdir)
        return self._prepare_copy(stage, ins, where)

    def _prepare_copy(self, stage: _Stage, ins: Instruction, where: str) -> _Prepared:
        kw = ins.keyword
        unknown = set(ins.flags) - {"chown", "chmod"}
        if "from" in unknown:
            raise ins.error("COPY --from needs another stage or image: multi-stage builds are not supported")
        if unknown:
            raise ins.error(f"{kw} flags not supported: {', '.join('--' + f for f in sorted(unknown))}")
        scope = stage.scope()
        words = ins.exec_form if ins.exec_form is not None else expand_words(ins.args, scope, escape=ins.escape,
                                                                             where=where)  # fmt: skip
        if len(words) < 2:
            raise ins.error(f"{kw} needs at least one source and a destination")
        *srcs, dest = words
        chown = expand(ins.flags["chown"], scope, where=where) if "chown" in ins.flags else None
        chmod = ins.flags.get("chmod")
        if chmod is not None and not all(c in "01234567" for c in chmod):
            raise ins.error(f"--chmod={chmod}: give an octal mode (e.g. --chmod=755)")
        if not dest.startswith("/"):
            dest = posixpath.join(stage.workdir, dest)
        into_dir = dest.endswith("/") or len(srcs) > 1
        plan: list[tuple[str, list[Source], IO[bytes] | None]] = []  # (dest dir, sources, or an ADD archive)
        for src in srcs:
            if kw == "ADD" and ("://" in src or src.startswith("git@")):
                raise ins.error(
                    f"ADD of a URL ({src}) is not supported: the build does not fetch; download it in a RUN step "
                    "(curl/wget, under the daemon's egress policy) or put the file in the build context"
                )
            plan.extend(self._sources(ins, src, dest, into_dir, kw == "ADD", where))
        digest = self.ctx.digest([s for _, srcs_, _ in plan for s in srcs_])
        part = {"args": words, "chown": chown, "chmod": chmod, "files": digest, "workdir": stage.workdir}
        return _Prepared(part, lambda sid: self._copy(sid, ins, plan, chown, chmod, into_dir, dest))

    def _sources(
        self, ins: Instruction, src: str, dest: str, into_dir: bool, add: bool, where: str
    ) -> list[tuple[str, list[Source], IO[bytes] | None]]:
        norm = normalise_source(src, where)
        names = self.ctx.match(norm) if any(c in norm for c in "*?[") else [self.ctx.resolve(norm)]
        names = [n for n in names if self.ctx.exists(n) and n != DOCKERFILE_MEMBER]
        if not names:
            raise ins.error(f"{src!r} is not in the build context (paths are relative to the context directory; "
                            "check .dockerignore)")  # fmt: skip
        out: list[tuple[str, list[Source], IO[bytes] | None]] = []
        for found in names:
            if self.ctx.is_dir(found):
                out.append((dest, [Source(f"{found}/{rel}", rel, m) for rel, m in self.ctx.under(found)], None))
                continue
            name = self.ctx.resolve(found)
            member = self.ctx.members.get(name)
            if member is None or member.isdir():
                raise ins.error(f"{src!r} is not a file in the build context")
            if add:
                archive = self.ctx.open_archive(name)
                if archive is not None:
                    with archive:
                        packed = repack_archive(archive)
                    out.append((dest, [Source(name, posixpath.basename(name), member)], packed))
                    continue
            if into_dir or len(names) > 1:
                out.append((dest, [Source(name, posixpath.basename(name), member)], None))
            else:
                out.append((posixpath.dirname(dest) or "/", [Source(name, posixpath.basename(dest), member)], None))
        return out

    # ---- running a step in the sandbox ----

    async def _ensure_sandbox(self, stage: _Stage) -> str:
        if self.sandbox is None:
            info = await self.host.create_on_layers(
                stage.layers, template=stage.base.digest, source="build", timeout=_BUILD_TIMEOUT_S
            )
            self.sandbox = info.id
        return self.sandbox

    async def _drop_sandbox(self) -> None:
        sid, self.sandbox = self.sandbox, None
        if sid is not None:
            with contextlib.suppress(BranchboxError):
                await asyncio.shield(self.host.destroy(sid))

    async def _run(self, stage: _Stage, ins: Instruction, sid: str, argv: list[str], env: dict[str, str]) -> None:
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        partial = [""]

        def out(data: bytes) -> None:
            text = data.decode("utf-8", "replace")
            self._log(text)
            lines = (partial[0] + text).split("\n")
            partial[0] = lines.pop()
            tail.extend(lines)

        res = await self.host.exec(
            sid, argv, env=env, cwd=stage.workdir, user=stage.user,
            on_stdout=out, on_stderr=out, max_output=0,
        )  # fmt: skip
        if partial[0]:
            tail.append(partial[0])
        if res.exit_code != 0:
            shown = "\n".join(tail)
            what = ins.args if ins.exec_form is None else json.dumps(argv)
            raise TemplateBuildError(
                f"Dockerfile line {ins.line}: RUN {what} failed (exit code {res.exit_code}); last {len(tail)} lines "
                f"of its output:\n{shown}",
                step=ins.source,
                line=ins.line,
                exit_code=res.exit_code,
            )

    async def _mkdir(self, sid: str, path: str, ins: Instruction) -> None:
        res = await self.host.exec(sid, ["mkdir", "-p", "--", path], max_output=4096)
        if res.exit_code != 0:
            raise TemplateBuildError(
                f"Dockerfile line {ins.line} (WORKDIR): mkdir -p {path} failed: "
                f"{res.stderr.decode(errors='replace').strip()}",
                line=ins.line,
            )

    async def _copy(
        self,
        sid: str,
        ins: Instruction,
        plan: list[tuple[str, list[Source], IO[bytes] | None]],
        chown: str | None,
        chmod: str | None,
        into_dir: bool,
        dest: str,
    ) -> None:
        if not into_dir and len(plan) == 1 and plan[0][2] is None and len(plan[0][1]) == 1:
            # COPY file /path: /path may be an existing directory of the image, then the file goes into it
            try:
                entry = await self.host.stat(sid, dest)
            except FileNotFoundInSandboxError:
                entry = None
            if entry is not None and entry.type == "dir":
                src = plan[0][1][0]
                plan = [(dest, [Source(src.name, posixpath.basename(src.name), src.member)], None)]
        touched: list[str] = []
        for dest_dir, sources, archive in plan:
            tar = archive if archive is not None else self.ctx.pack(sources)
            with tar:
                await self.host.upload_archive(sid, dest_dir, _chunks(tar))
            if archive is not None:
                continue  # an ADD archive's files keep their owners and modes (root)
            tops = {s.dest.split("/", 1)[0] for s in sources}
            touched += [posixpath.join(dest_dir, t) for t in sorted(tops)] or [dest_dir]
        for flag, value, tool in (("chown", chown, "chown"), ("chmod", chmod, "chmod")):
            if value is None or not touched:
                continue
            res = await self.host.exec(sid, [tool, "-R", value, "--", *touched], max_output=8192)
            if res.exit_code != 0:
                raise TemplateBuildError(
                    f"Dockerfile line {ins.line} ({ins.keyword} --{flag}={value}): {tool} failed "
                    f"(exit code {res.exit_code}): {res.stderr.decode(errors='replace').strip()}",
                    line=ins.line,
                    exit_code=res.exit_code,
                )

    # ---- the template ----

    async def _commit(self, stage: _Stage) -> TemplateInfo:
        store = self.host.templates
        digest = _h("dockerfile-template", BUILD_VERSION, stage.key, stage.env, stage.workdir, stage.user)
        base_meta = store.metadata(stage.base.digest)
        lowers = [self.host.lower_path(x) for x in stage.layers]
        bases = set(self.host.layer_uid_bases(stage.layers))  # the build sandboxes' uid ranges (issue 22.1)
        base_root = store.rootfs(stage.base.digest)

        def fill(rootfs: Path) -> None:
            flatten_into([*lowers, base_root], rootfs)
            strip_overlay_marks(rootfs)
            if bases - {store.idmap.host_base}:  # a template is owned by the canonical range, like its base
                rebase_tree(rootfs, bases, store.idmap)
            wd = rootfs / stage.workdir.lstrip("/")
            if not wd.exists():
                wd.mkdir(parents=True, exist_ok=True)

        meta = {
            "source": "dockerfile",
            "python": base_meta.get("python", stage.base.python),
            "python_version": base_meta.get("python_version", ""),
            **({"shell": base_meta["shell"]} if "shell" in base_meta else {}),
            "env": stage.env,
            "workdir": stage.workdir,
            "user": stage.user,
            "base": {"name": stage.base.name, "digest": stage.base.digest},
            "dockerfile": {k: v for k, v in stage.config.items() if k != "global_args"},
            "build_key": stage.key,
        }
        self._emit({"type": "commit", "message": f"writing template {self.name}"})
        return await store.commit_tree(digest, name=self.name, fill=fill, meta=meta)


@dataclass
class _Prepared:
    cache_part: dict[str, Any]
    run: Callable[[str], Any]
    workdir: str | None = None


async def _chunks(fh: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(fh.read, _CHUNK):
        yield chunk


def _loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def strip_overlay_marks(root: Path) -> None:
    """Remove overlay whiteouts and opaque marks from a flattened full tree (nothing lies below it any more)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if is_whiteout(st):
                os.unlink(p)
            elif stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(OSError):
                    os.removexattr(p, OPAQUE_XATTR, follow_symlinks=False)
