"""Declarative template specs: a TOML file describing a root filesystem, and its content digest.

A spec is pure data. :func:`load_spec` validates a TOML file and names the field to fix when something is
wrong; :meth:`TemplateSpec.digest` hashes everything that affects the built rootfs, so identical specs
build once.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from branchbox.errors import TemplateSpecError

# Bump when the builder changes in a way that changes its output: every cached template is then rebuilt.
BUILDER_VERSION = "1"

VARIANTS = (
    "extract",
    "custom",
    "essential",
    "apt",
    "required",
    "minbase",
    "buildd",
    "important",
    "debootstrap",
    "standard",
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
_DEB_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?$")
_PIP_RE = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"  # project name
    r"(?:\[[A-Za-z0-9._-]+(?:,[A-Za-z0-9._-]+)*\])?"  # extras
    r"(?:\s*(?:===|==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!_-]+"  # first version clause
    r"(?:\s*,\s*(?:===|==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?$"  # more clauses
)
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

_KEYS = {
    "name",
    "suite",
    "variant",
    "packages",
    "pip_packages",
    "files",
    "env",
    "run",
    "workdir",
    "user",
    "python",
    "mirror",
}
_FILE_KEYS = {"content", "source", "mode"}

DEFAULT_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One file placed in the rootfs: inline ``content`` or a host ``source`` file (absolute once loaded)."""

    content: str | None = None
    source: Path | None = None
    mode: int = 0o644

    def data(self) -> bytes:
        """The bytes to write (reads ``source`` from the host)."""
        if self.content is not None:
            return self.content.encode()
        assert self.source is not None
        try:
            return self.source.read_bytes()
        except OSError as exc:
            raise TemplateSpecError(
                f"files: cannot read source {str(self.source)!r} ({exc.strerror}): fix the path "
                "(relative paths are resolved against the spec file's directory)"
            ) from exc


def _frozen_map(m: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class TemplateSpec:
    """What a template contains. Field meanings are documented in docs/templates.md."""

    name: str
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    pip_packages: tuple[str, ...] = ()
    files: Mapping[str, FileSpec] = field(default_factory=dict)  # sandbox path -> file
    env: Mapping[str, str] = field(default_factory=dict)  # stored in template.json, applied by the agent
    run: tuple[str, ...] = ()  # shell steps run as root in the rootfs, in order
    workdir: str = "/"
    user: str = "root"
    python: str = DEFAULT_PYTHON  # the default may be missing (the template then has none); another must exist
    mirror: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "packages", tuple(self.packages))
        object.__setattr__(self, "pip_packages", tuple(self.pip_packages))
        object.__setattr__(self, "run", tuple(self.run))
        object.__setattr__(self, "files", _frozen_map(self.files))
        object.__setattr__(self, "env", _frozen_map(self.env))
        _validate(self)

    def canonical(self) -> dict[str, Any]:
        """Everything that affects the built template, as JSON-able data (file contents by sha256)."""
        return {
            "builder": BUILDER_VERSION,
            "suite": self.suite,
            "variant": self.variant,
            "packages": sorted(set(self.packages)),
            "pip_packages": list(self.pip_packages),
            "files": {
                path: {"sha256": hashlib.sha256(f.data()).hexdigest(), "mode": f.mode}
                for path, f in sorted(self.files.items())
            },
            "env": dict(sorted(self.env.items())),
            "run": list(self.run),
            "workdir": self.workdir,
            "user": self.user,
            "python": self.python,
            "mirror": self.mirror,
        }

    def digest(self) -> str:
        """sha256 (hex) of :meth:`canonical`; the name is not part of it."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def is_digest(value: str) -> bool:
    """True for a full 64-hex sha256 digest."""
    return bool(_DIGEST_RE.match(value))


def check_name(name: str) -> str:
    """Validate a template name (also used by imports)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or is_digest(name):
        raise TemplateSpecError(
            f"name: {name!r} is not a valid template name: use 1-63 characters of a-z, 0-9, '.', '_', '-' "
            "starting with a letter or digit (and not a 64-hex digest)"
        )
    return name


def _check_abs(fieldname: str, value: str) -> None:
    ok = value == "/" or (value.startswith("/") and not value.startswith("//") and posixpath.normpath(value) == value)
    if not ok or "\0" in value:
        raise TemplateSpecError(
            f"{fieldname}: {value!r} must be a normalised absolute path inside the sandbox (e.g. '/work')"
        )


def _validate(spec: TemplateSpec) -> None:
    check_name(spec.name)
    if not _SUITE_RE.match(spec.suite):
        raise TemplateSpecError(f"suite: {spec.suite!r} is not a Debian suite name (e.g. 'bookworm')")
    if spec.variant not in VARIANTS:
        raise TemplateSpecError(f"variant: {spec.variant!r} is not one of {', '.join(VARIANTS)}")
    for pkg in spec.packages:
        if not isinstance(pkg, str) or not _DEB_RE.match(pkg):
            raise TemplateSpecError(
                f"packages: {pkg!r} is not a Debian package name: use lowercase names like 'python3' or "
                "'git=1:2.39.5-0+deb12u1'"
            )
    for req in spec.pip_packages:
        if not isinstance(req, str) or not _PIP_RE.match(req):
            raise TemplateSpecError(
                f"pip_packages: {req!r} is not a pip requirement: use 'name', 'name==1.2' or 'name[extra]>=1'"
            )
    if spec.pip_packages and "python3-pip" not in {p.split("=")[0].split(":")[0] for p in spec.packages}:
        raise TemplateSpecError("pip_packages: installing pip packages needs pip: add 'python3-pip' to packages")
    for path, f in spec.files.items():
        _check_abs("files", path)
        if path == "/":
            raise TemplateSpecError("files: '/' is not a file path")
        if not isinstance(f, FileSpec) or (f.content is None) == (f.source is None):
            raise TemplateSpecError(f"files.{path!r}: give exactly one of 'content' or 'source'")
        if not 0 <= f.mode <= 0o7777:
            raise TemplateSpecError(f"files.{path!r}.mode: {f.mode:o} is not a file mode (e.g. 0o644)")
    for key, value in spec.env.items():
        if not _ENV_RE.match(key) or not isinstance(value, str) or "\0" in value:
            raise TemplateSpecError(f"env.{key}: names are [A-Za-z_][A-Za-z0-9_]* and values strings")
    for step in spec.run:
        if not isinstance(step, str) or not step.strip():
            raise TemplateSpecError("run: every step must be a non-empty shell command string")
    _check_abs("workdir", spec.workdir)
    _check_abs("python", spec.python)
    if not _USER_RE.match(spec.user):
        raise TemplateSpecError(f"user: {spec.user!r} is not a valid user name (e.g. 'root')")
    if spec.mirror is not None and (not spec.mirror or spec.mirror.startswith("-") or "\n" in spec.mirror):
        raise TemplateSpecError(
            f"mirror: {spec.mirror!r} is not a mirror: use a URL like 'http://deb.debian.org/debian' or a "
            "'deb ...' line"
        )


def _expect(fieldname: str, value: Any, typ: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise TemplateSpecError(f"{fieldname}: expected {what}, got {type(value).__name__} {value!r}")
    return value


def _str_list(fieldname: str, value: Any) -> tuple[str, ...]:
    _expect(fieldname, value, list, "a list of strings")
    for item in value:
        _expect(fieldname, item, str, "a list of strings")
    return tuple(value)


def _parse_mode(fieldname: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TemplateSpecError(f'{fieldname}: expected an octal mode like 0o644 or "0644", got {value!r}')


def _parse_files(value: Any, base: Path) -> dict[str, FileSpec]:
    _expect("files", value, dict, "a table of sandbox path = content or {content|source, mode}")
    out: dict[str, FileSpec] = {}
    for path, entry in value.items():
        where = f"files.{path!r}"
        if isinstance(entry, str):
            out[path] = FileSpec(content=entry)
            continue
        _expect(where, entry, dict, "a string or a table with 'content' or 'source' and optional 'mode'")
        unknown = set(entry) - _FILE_KEYS
        if unknown:
            raise TemplateSpecError(f"{where}: unknown key(s) {sorted(unknown)}: use content, source, mode")
        mode = _parse_mode(f"{where}.mode", entry.get("mode", 0o644))
        content = entry.get("content")
        source = entry.get("source")
        if content is not None:
            _expect(f"{where}.content", content, str, "a string")
        src_path: Path | None = None
        if source is not None:
            _expect(f"{where}.source", source, str, "a path relative to the spec file")
            src_path = (base / source).resolve()
            if not src_path.is_file():
                raise TemplateSpecError(f"{where}.source: {str(src_path)!r} is not a file: fix the path")
        if (content is None) == (source is None):
            raise TemplateSpecError(f"{where}: give exactly one of 'content' or 'source'")
        out[path] = FileSpec(content=content, source=src_path, mode=mode)
    return out


def parse_spec(data: Mapping[str, Any], *, base_dir: Path) -> TemplateSpec:
    """Build a spec from parsed TOML data; ``base_dir`` resolves relative file sources."""
    unknown = set(data) - _KEYS
    if unknown:
        raise TemplateSpecError(
            f"unknown key(s) {sorted(unknown)}: a template spec may only have {', '.join(sorted(_KEYS))}"
        )
    if "name" not in data:
        raise TemplateSpecError('name: missing: add name = "my-template" at the top of the spec')
    kwargs: dict[str, Any] = {"name": _expect("name", data["name"], str, "a string")}
    for key in ("suite", "variant", "workdir", "user", "python"):
        if key in data:
            kwargs[key] = _expect(key, data[key], str, "a string")
    if "mirror" in data:
        kwargs["mirror"] = _expect("mirror", data["mirror"], str, "a string (URL or 'deb ...' line)")
    for key in ("packages", "pip_packages", "run"):
        if key in data:
            kwargs[key] = _str_list(key, data[key])
    if "env" in data:
        env = _expect("env", data["env"], dict, 'a table of NAME = "value"')
        for k, v in env.items():
            _expect(f"env.{k}", v, str, "a string")
        kwargs["env"] = env
    if "files" in data:
        kwargs["files"] = _parse_files(data["files"], base_dir)
    return TemplateSpec(**kwargs)


def load_spec(path: Path) -> TemplateSpec:
    """Read and validate a TOML template spec."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TemplateSpecError(f"cannot read spec {str(path)!r}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TemplateSpecError(f"{path}: not valid TOML: {exc}") from exc
    return parse_spec(data, base_dir=path.resolve().parent)


def default_spec() -> TemplateSpec:
    """The bundled default template (Debian 12 minbase with python3, git, bash, curl and a /work dir)."""
    res = resources.files("branchbox.templates").joinpath("default.toml")
    data = tomllib.loads(res.read_text())
    return parse_spec(data, base_dir=Path(str(res)).parent)
