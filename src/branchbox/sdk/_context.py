"""The build context of ``Template.build``: a tar of a local directory, minus what ``.dockerignore`` excludes.

Symlinks are packed as symlinks (never followed: a link to ``/etc/passwd`` sends the link, not the host's
file), so the daemon sees only what is inside the directory. ``.dockerignore`` follows Docker's rules: one
pattern a line, ``#`` comments, ``*``/``?``/``[...]`` within a path component, ``**`` for any number of
components, ``!`` re-includes, the last matching line wins, and an excluded directory excludes what is below
it. A Dockerfile outside the context (or excluded by it) is sent as ``.branchbox.Dockerfile``.
"""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
import tempfile
from pathlib import Path
from typing import IO

DOCKERFILE_MEMBER = ".branchbox.Dockerfile"  # the daemon's images.dockerfile_context uses the same name
_SPOOL = 8 << 20


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # '**/' matches zero or more directories
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith(("!", "^")):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


class DockerIgnore:
    """The patterns of a ``.dockerignore`` file."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = posixpath.normpath(line).lstrip("/")
            if line in ("", "."):
                continue
            self.rules.append((negate, _pattern_regex(line)))

    @property
    def has_negations(self) -> bool:
        """Whether a ``!`` line may re-include something below an excluded directory (then it is walked)."""
        return any(negate for negate, _ in self.rules)

    def excluded(self, name: str) -> bool:
        """Whether the context path ``name`` (relative, ``/``-separated) is left out."""
        parts = name.split("/")
        excluded = False
        for negate, rx in self.rules:
            # a pattern matching a parent directory matches everything below it
            if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                excluded = not negate
        return excluded


def pack_context(context: str | Path, dockerfile: str | Path | None = None) -> tuple[IO[bytes], str]:
    """A tar of ``context`` (a spooled temporary file at offset 0) and the Dockerfile's path inside it.

    ``dockerfile`` defaults to ``CONTEXT/Dockerfile``; a relative path is taken from the current directory (as
    ``docker build -f``)."""
    root = Path(context)
    if not root.is_dir():
        raise ValueError(f"the build context {str(root)!r} is not a directory")
    df = Path(dockerfile) if dockerfile is not None else root / "Dockerfile"
    if not df.is_file():
        raise ValueError(f"no Dockerfile at {str(df)!r}: pass dockerfile= (CLI: -f)")
    ignore_file = root / ".dockerignore"
    ignore = DockerIgnore(ignore_file.read_text() if ignore_file.is_file() else "")
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - returned to the caller
    inside: str | None = None
    try:
        df_real = df.resolve()
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(root):
                rel_dir = os.path.relpath(dirpath, root)
                rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
                kept_dirs = []
                for d in sorted(dirnames):
                    rel = f"{rel_dir}/{d}" if rel_dir else d
                    full = os.path.join(dirpath, d)
                    if os.path.islink(full):  # a symlink to a directory: packed as a link, not walked
                        filenames.append(d)
                        continue
                    if ignore.excluded(rel) and not ignore.has_negations:
                        continue
                    kept_dirs.append(d)
                    if not ignore.excluded(rel):
                        tar.add(full, arcname=rel, recursive=False)
                dirnames[:] = kept_dirs
                for f in sorted(filenames):
                    rel = f"{rel_dir}/{f}" if rel_dir else f
                    full = os.path.join(dirpath, f)
                    if ignore.excluded(rel):
                        continue
                    if not (os.path.islink(full) or os.path.isfile(full) or os.path.isdir(full)):
                        continue  # sockets, fifos, devices
                    tar.add(full, arcname=rel, recursive=False)
                    if inside is None and not os.path.islink(full) and Path(full).resolve() == df_real:
                        inside = rel
            if inside is None:
                tar.add(str(df), arcname=DOCKERFILE_MEMBER, recursive=False)
                inside = DOCKERFILE_MEMBER
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, inside
