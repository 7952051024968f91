"""Build a rootfs from a :class:`TemplateSpec`: mmdebstrap, pip, files, run steps, cleanup, ownership shift.

Commands inside the rootfs run under ``unshare --mount --pid --fork --kill-child`` + ``chroot``: /proc and
/dev are mounted in a private mount namespace, so they disappear with the step however it ends, and every
process a step leaves behind dies with the step's pid namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from branchbox.backends.base import IdMap
from branchbox.errors import TemplateBuildError
from branchbox.images.importer import check_rootfs, has_executable, resolve_in_root
from branchbox.images.shift import shift_tree
from branchbox.images.spec import DEFAULT_PYTHON, TemplateSpec

TAIL_LINES = 40
_BUILD_DIR = ".branchbox-build"  # in the rootfs during the build only (CA bundle for pip/curl/git)
_HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
_PASS_ENV = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_DEFAULT_TIMEOUT",
)
_MMDEBSTRAP_STAGES = (
    ("running apt-get update", 0.1),
    ("downloading packages", 0.2),
    ("extracting archives", 0.4),
    ("installing essential packages", 0.5),
    ("installing remaining packages", 0.7),
    ("cleaning up", 0.9),
    ("success", 1.0),
)
_CHROOT_WRAPPER = (
    'set -e; r="$1"; shift; mount -t proc proc "$r/proc"; mount --rbind /dev "$r/dev"; exec chroot "$r" "$@"'
)


@dataclass(frozen=True, slots=True)
class BuildEvent:
    """Progress of a build or import. ``fraction`` is the progress of ``step`` in [0, 1] when known."""

    step: str
    message: str
    fraction: float | None = None


Progress = Callable[[BuildEvent], None]


def _emit(progress: Progress | None, step: str, message: str, fraction: float | None = None) -> None:
    if progress is not None:
        progress(BuildEvent(step, message, fraction))


def _stage_fraction(line: str) -> float | None:
    for marker, fraction in _MMDEBSTRAP_STAGES:
        if marker in line:
            return fraction
    return None


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill a step: first unshare's forked child (the pid namespace's init, which takes the namespace with it)
    so that unshare reaps it and no orphan is left, then the whole process group."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as fh:  # noqa: ASYNC230 - procfs, instant
            children = [int(p) for p in fh.read().split()]
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    if children:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def run_logged(
    argv: Sequence[str],
    *,
    step: str,
    progress: Progress | None,
    env: Mapping[str, str] | None = None,
    fractions: Callable[[str], float | None] | None = None,
    label: str | None = None,
) -> list[str]:
    """Run ``argv`` streaming its output as events; on failure raise TemplateBuildError naming ``step``."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        raise TemplateBuildError(f"step {step!r}: cannot run {argv[0]!r}: {exc.strerror}") from exc
    assert proc.stdout is not None
    try:
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            _emit(progress, step, line, fractions(line) if fractions else None)
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            await _kill(proc)
    if code != 0:
        output = "\n".join(tail)
        what = label or step
        raise TemplateBuildError(
            f"template build step {what} failed (exit code {code}); last {len(tail)} lines of its output:\n{output}",
            step=step,
            exit_code=code,
        )
    return list(tail)


def _chroot_argv(rootfs: Path, argv: Sequence[str]) -> list[str]:
    return [
        "unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private", "--",
        "/bin/sh", "-c", _CHROOT_WRAPPER, "sh", str(rootfs), *argv,
    ]  # fmt: skip


def _step_env(spec: TemplateSpec, ca: str | None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.update({k: os.environ[k] for k in _PASS_ENV if k in os.environ})
    env.update(spec.env)
    if ca is not None:
        for key in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"):
            env[key] = ca
    return env


@contextlib.contextmanager
def _build_environment(rootfs: Path) -> Iterator[str | None]:
    """Network config, a no-daemons policy-rc.d and the host CA bundle, present only while steps run."""
    added: list[Path] = []
    resolv = rootfs / "etc/resolv.conf"
    if not os.path.lexists(resolv) and Path("/etc/resolv.conf").is_file():
        shutil.copyfile("/etc/resolv.conf", resolv)
        added.append(resolv)
    policy = rootfs / "usr/sbin/policy-rc.d"
    if not os.path.lexists(policy) and policy.parent.is_dir():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        added.append(policy)
    ca: str | None = None
    build_dir = rootfs / _BUILD_DIR
    if _HOST_CA.is_file():
        build_dir.mkdir(mode=0o755)
        shutil.copyfile(_HOST_CA, build_dir / "ca.crt")
        ca = f"/{_BUILD_DIR}/ca.crt"
    try:
        yield ca
    finally:
        for path in added:
            path.unlink(missing_ok=True)
        shutil.rmtree(build_dir, ignore_errors=True)


def write_file(rootfs: Path, path: str, data: bytes, mode: int) -> None:
    """Write ``data`` at sandbox ``path`` (symlinks resolved inside the rootfs), root-owned, with ``mode``."""
    parent = resolve_in_root(rootfs, os.path.dirname(path))
    parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    target = parent / os.path.basename(path)
    if target.is_symlink():
        target = resolve_in_root(rootfs, path)
    tmp = target.with_name(f".{target.name}.bbtmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chown(tmp, 0, 0)
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def clean_caches(rootfs: Path) -> None:
    """Remove apt package caches and lists and pip caches (they only make the template bigger)."""
    for pattern in (
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
        "root/.cache/pip",
    ):
        for p in rootfs.glob(pattern):
            if p.name in {"lock", "partial"}:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _has_user(rootfs: Path, user: str) -> bool:
    passwd = rootfs / "etc/passwd"
    if not passwd.is_file():
        return False
    return any(line.split(":", 1)[0] == user for line in passwd.read_text().splitlines())


async def build_rootfs(spec: TemplateSpec, rootfs: Path, *, idmap: IdMap, progress: Progress | None) -> str:
    """Build ``spec`` into ``rootfs`` (which must not exist yet); returns the python version ('3.11')."""
    # Own mount and pid namespaces: whatever mmdebstrap mounts or starts vanishes with it, even when killed.
    argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private", "--"]
    argv += ["mmdebstrap", "--mode=root", f"--variant={spec.variant}"]
    if spec.packages:
        argv.append("--include=" + ",".join(spec.packages))
    argv += [spec.suite, str(rootfs)]
    if spec.mirror:
        argv.append(spec.mirror)
    _emit(progress, "mmdebstrap", " ".join(argv[8:]), 0.0)
    await run_logged(argv, step="mmdebstrap", progress=progress, fractions=_stage_fraction)

    with _build_environment(rootfs) as ca:
        env = _step_env(spec, ca)
        if spec.pip_packages:
            pip = [spec.python, "-m", "pip", "install", "--break-system-packages", "--no-cache-dir",
                   *spec.pip_packages]  # fmt: skip
            _emit(progress, "pip", " ".join(pip), 0.0)
            await run_logged(_chroot_argv(rootfs, pip), step="pip", progress=progress, env=env)
        for path, f in spec.files.items():
            _emit(progress, "files", f"write {path} (mode {f.mode:o})")
            write_file(rootfs, path, f.data(), f.mode)
        for i, command in enumerate(spec.run, 1):
            step = f"run[{i}]"
            _emit(progress, step, f"$ {command}", 0.0)
            await run_logged(
                _chroot_argv(rootfs, ["/bin/sh", "-c", command]),
                step=step,
                progress=progress,
                env=env,
                label=f"{step} ({command!r})",
            )
        resolve_in_root(rootfs, spec.workdir).mkdir(mode=0o755, parents=True, exist_ok=True)
        lines: list[str] = []
        if spec.python != DEFAULT_PYTHON or has_executable(rootfs, spec.python):  # none at all is fine
            check_rootfs(rootfs, spec.python)
            lines = await run_logged(
                _chroot_argv(rootfs, [spec.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]),
                step="inspect python",
                progress=progress,
                env=env,
            )
    if not _has_user(rootfs, spec.user):
        raise TemplateBuildError(
            f"user: {spec.user!r} does not exist in the built rootfs: create it in a run step "
            f"(e.g. 'useradd -m {spec.user}') or use user = \"root\""
        )
    _emit(progress, "cleanup", "removing apt and pip caches")
    await asyncio.to_thread(clean_caches, rootfs)
    _emit(progress, "shift", f"shifting ownership by +{idmap.host_base}")
    await asyncio.to_thread(shift_tree, rootfs, idmap)
    return lines[-1].strip() if lines else ""
