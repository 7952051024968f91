"""Image references in skopeo's transport syntax, and ``skopeo copy`` of one into a local OCI layout.

Transports: ``docker://[HOST[:PORT]/]REPO[:TAG|@sha256:HEX]`` (a registry), ``docker-daemon:REPO:TAG`` (a local
Docker daemon), ``docker-archive:PATH[:REF]`` (``docker save``), ``oci-archive:PATH[:REF]`` and ``oci:DIR[:REF]``
(an OCI layout). The copy writes its blobs into a shared blob directory (the store's ``blobs/``), so a second
import of the same image, or of one sharing layers, downloads only what is new; the layout itself is a throwaway
``index.json`` naming the image's manifest. Credentials never reach skopeo's argv (other host users can read it):
``user:pass`` is written to a 0600 auth file in the import's private temp dir. Without credentials skopeo runs
with ``--src-no-creds``, so root's own registry logins are never used on a caller's behalf.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from branchbox.errors import (
    BranchboxError,
    ImageDigestMismatchError,
    ImageNotFoundError,
    ImageReferenceError,
    RegistryAuthError,
    RegistryUnreachableError,
    TemplateBuildError,
    UnsupportedImageError,
)

TRANSPORTS = ("docker", "docker-daemon", "docker-archive", "oci-archive", "oci")
_DOMAIN = (
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::\d{1,5})?"
)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(
    rf"(?P<name>(?:(?P<domain>{_DOMAIN})/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
_IMAGE_ID_RE = re.compile(r"(?:sha256:)?[0-9a-f]{64}")
_REF_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}")
_MAX_REF = 1024


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed reference: ``transport`` and ``target`` as skopeo takes them (``str(ref)``)."""

    transport: str
    target: str
    registry: str = ""  # docker:// only: the host whose credentials apply (docker.io for short names)

    def __str__(self) -> str:
        return f"{self.transport}:{self.target}"


def _bad(ref: str, why: str) -> ImageReferenceError:
    return ImageReferenceError(
        f"bad image reference {ref[:200]!r}: {why}; use skopeo's syntax, e.g. docker://registry:5000/repo:tag, "
        "docker-daemon:repo:tag, docker-archive:/path/image.tar, oci-archive:/path/image.tar or oci:/path/dir:tag",
        reference=ref[:200],
    )


def _check_name(ref: str, name: str) -> re.Match[str]:
    m = _NAME_RE.fullmatch(name)
    if m is None or len(m["name"]) > 255:
        raise _bad(ref, f"{name!r} is not an image name (lower-case repository path, optional :tag or @sha256:)")
    return m


def parse_ref(ref: str, *, cwd: Path | None = None) -> ImageRef:
    """Validate ``ref`` (ImageReferenceError says what is wrong); relative paths are made absolute from ``cwd``."""
    if not ref or len(ref) > _MAX_REF or any(ord(c) < 0x21 or c == "\x7f" for c in ref):
        raise _bad(ref, "empty, too long, or has spaces or control characters")
    transport, sep, target = ref.partition(":")
    if not sep or transport not in TRANSPORTS:
        raise _bad(ref, f"unknown transport {transport!r} (one of {', '.join(TRANSPORTS)})")
    if transport == "docker":
        if not target.startswith("//"):
            raise _bad(ref, "a registry reference starts with docker://")
        name = target[2:]
        m = _check_name(ref, name)
        domain = m["domain"]
        if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
            domain = None  # 'library/x': a path component, not a host
        return ImageRef(transport, target, registry=domain or "docker.io")
    if transport == "docker-daemon":
        if not _IMAGE_ID_RE.fullmatch(target):
            m = _check_name(ref, target)
            if m["tag"] is None and m["digest"] is None:
                raise _bad(ref, "docker-daemon: needs a tag (docker-daemon:repo:tag) or an image id")
        return ImageRef(transport, target)
    path, _, ref_name = target.partition(":")
    if not path:
        raise _bad(ref, f"{transport}: needs a path")
    if ref_name and not _REF_NAME_RE.fullmatch(ref_name):
        raise _bad(ref, f"{ref_name!r} is not a reference name inside the archive or layout")
    full = Path(path) if path.startswith("/") else (cwd or Path.cwd()) / path
    full = Path(os.path.normpath(full))
    if ":" in str(full):
        raise _bad(ref, "the path has a ':' (skopeo cannot tell it from the reference name): rename it")
    want_dir = transport == "oci"
    if not (full.is_dir() if want_dir else full.is_file()):
        raise ImageNotFoundError(
            f"{ref[:200]!r}: no {'directory' if want_dir else 'file'} at {str(full)!r}", reference=ref[:200]
        )
    return ImageRef(transport, f"{full}:{ref_name}" if ref_name else str(full))


def write_authfile(path: Path, registry: str, creds: str) -> None:
    """A containers-auth.json with ``user:pass`` for ``registry`` (mode 0600, never logged)."""
    user, sep, _password = creds.partition(":")
    if not user or not sep:
        raise ImageReferenceError("credentials are USER:PASSWORD (got no ':'); or pass an auth file")
    entry = {"auths": {registry: {"auth": base64.b64encode(creds.encode()).decode()}}}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(entry, fh)


_NOT_FOUND = (
    "manifest unknown",
    "no descriptor found",
    "name unknown",
    "not found",
    "no such file",
    "does not exist",
    "no such image",
)
_AUTH = ("unauthorized", "authentication required", "invalid username/password", "access to the resource is denied")
_UNREACHABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "network is unreachable",
    "connection reset",
    "tls:",
    "x509",
    "cannot connect to the docker daemon",
    "is the docker daemon running",
    "dial unix",
    "pinging container registry",
)


def classify(stderr: str, ref: ImageRef, secrets_: tuple[str, ...] = ()) -> BranchboxError:
    """The typed error for a failed ``skopeo copy`` (its last lines in the message, secrets scrubbed)."""
    text = stderr
    for s in secrets_:
        if s:
            text = text.replace(s, "***")
    tail = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])[-600:]
    low = text.lower()
    what = f"importing {str(ref)[:200]!r} failed: {tail}"
    rules: list[tuple[bool, type[BranchboxError], str]] = [
        (
            "http response to https client" in low,
            RegistryUnreachableError,
            "; the registry speaks plain HTTP: pass --insecure (tls_verify=False) if you trust the network",
        ),
        ("invalid reference format" in low or "invalid image name" in low, ImageReferenceError, ""),
        (
            "no image found in manifest list" in low or "choosing image instance" in low,
            UnsupportedImageError,
            "; the image has no variant for this host's platform",
        ),
        ("digest" in low and ("not match" in low or "mismatch" in low), ImageDigestMismatchError, ""),
        (
            any(s in low for s in _AUTH),
            RegistryAuthError,
            "; pass credentials (--creds USER:PASSWORD or --authfile FILE), or check the name: some registries "
            "answer 'denied' for images that do not exist",
        ),
        (any(s in low for s in _UNREACHABLE), RegistryUnreachableError, ""),
        (any(s in low for s in _NOT_FOUND), ImageNotFoundError, ""),
    ]
    for matched, cls, hint in rules:
        if matched:
            return cls(what + hint, reference=str(ref)[:200])
    return TemplateBuildError(what, step="skopeo copy", reference=str(ref)[:200])


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """How to reach the image: ``creds`` 'user:pass' or an ``authfile`` (registry only), ``tls_verify``;
    ``daemon_host`` the Docker daemon of ``docker-daemon:`` (default: its own default, /var/run/docker.sock)."""

    creds: str | None = None
    authfile: Path | None = None
    tls_verify: bool = True
    daemon_host: str | None = None
    timeout: float = 3600.0


def skopeo_argv(ref: ImageRef, layout: Path, blobs: Path, opts: FetchOptions) -> list[str]:
    """The ``skopeo copy`` command line (writes the auth file for ``opts.creds`` next to ``layout``)."""
    blobs.mkdir(mode=0o700, parents=True, exist_ok=True)
    argv = ["skopeo", "copy", "--dest-shared-blob-dir", str(blobs)]
    if ref.transport == "docker":
        if opts.creds and opts.authfile:
            raise ImageReferenceError("give credentials or an auth file, not both")
        if opts.creds:
            authfile = layout.parent / "auth.json"
            write_authfile(authfile, ref.registry, opts.creds)
            argv += ["--src-authfile", str(authfile)]
        elif opts.authfile:
            if not Path(opts.authfile).is_file():
                raise ImageReferenceError(f"auth file {str(opts.authfile)!r} does not exist")
            argv += ["--src-authfile", str(opts.authfile)]
        else:
            argv.append("--src-no-creds")
        argv.append(f"--src-tls-verify={'true' if opts.tls_verify else 'false'}")
    elif opts.creds or opts.authfile:
        raise ImageReferenceError(f"credentials apply to docker:// references only, not {ref.transport}:")
    if opts.daemon_host:
        if ref.transport != "docker-daemon" or not re.fullmatch(r"(unix|tcp)://[^\s]+", opts.daemon_host):
            raise ImageReferenceError("daemon_host applies to docker-daemon: only, as unix:///PATH or tcp://HOST:PORT")
        argv.append(f"--src-daemon-host={opts.daemon_host}")
    return [*argv, "--", str(ref), f"oci:{layout}:image"]


async def fetch(
    ref: ImageRef, layout: Path, blobs: Path, opts: FetchOptions, on_line: Callable[[str], None] | None = None
) -> None:
    """``skopeo copy REF oci:LAYOUT:image`` with blobs in ``blobs``; raises the typed error on failure.

    ``layout``'s parent must be a private temp dir (the auth file goes there)."""
    argv = skopeo_argv(ref, layout, blobs, opts)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    stderr_task = asyncio.ensure_future(proc.stderr.read(1 << 20))

    async def pump() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line and on_line is not None:
                on_line(line)

    try:
        try:
            await asyncio.wait_for(pump(), opts.timeout)
        except TimeoutError:
            raise RegistryUnreachableError(
                f"importing {str(ref)[:200]!r} took more than {opts.timeout:.0f} s; raise the timeout or check the "
                "registry",
                reference=str(ref)[:200],
            ) from None
        rc = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        stderr_task.cancel()
        raise
    stderr = (await stderr_task).decode(errors="replace")
    if rc != 0:
        password = (opts.creds or "").partition(":")[2]
        raise classify(stderr, ref, (password,))
