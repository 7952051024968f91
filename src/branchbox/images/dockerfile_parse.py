"""Dockerfile syntax: instructions with their line numbers, and Docker's word expansion.

``parse(text)`` splits a Dockerfile into :class:`Instruction` s: parser directives (``# escape=``; ``# syntax=``
is ignored), comments, line continuations (the escape character at the end of a line; comment and empty lines
inside a continuation are dropped, as Docker does), the exec (JSON array) vs shell form, and ``--flag=value``
options of COPY/ADD/RUN. Heredocs (``<<EOF``) are refused.

``expand(text, env)`` / ``expand_words(text, env)`` are Docker's word processing for the instructions it
substitutes (FROM, COPY, ADD, ENV, ARG, LABEL, WORKDIR, USER, EXPOSE, STOPSIGNAL, VOLUME): ``$VAR``, ``${VAR}``,
``${VAR:-word}``, ``${VAR-word}``, ``${VAR:+word}``, ``${VAR+word}``, ``${VAR:?message}``, ``${VAR?message}``;
single quotes are literal, double quotes substitute, the escape character escapes. RUN, CMD and ENTRYPOINT are
not substituted (their shell does it).

Errors are :class:`TemplateSpecError` (code ``invalid_template_spec``) naming the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from branchbox.errors import TemplateSpecError

_DIRECTIVE = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*?)\s*$")
_KEYWORD = re.compile(r"^([A-Za-z]+)(?:\s+|$)")
_FLAG = re.compile(r"^--([A-Za-z][A-Za-z0-9-]*)(?:=(\S*))?(?:\s+|$)")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]")
_HEREDOC = re.compile(r"<<-?\s*[\"']?[A-Za-z_][A-Za-z0-9_]*")
FLAGGED = frozenset({"COPY", "ADD", "RUN", "FROM"})


@dataclass(frozen=True, slots=True)
class Instruction:
    """One instruction: ``keyword`` upper-case, ``args`` the text after it and its flags (continuations joined),
    ``exec_form`` the JSON array when the arguments are one, ``line`` its first line (1-based)."""

    keyword: str
    args: str
    line: int
    flags: dict[str, str] = field(default_factory=dict)
    exec_form: list[str] | None = None
    source: str = ""
    escape: str = "\\"

    def error(self, message: str) -> TemplateSpecError:
        return TemplateSpecError(
            f"Dockerfile line {self.line} ({self.keyword}): {message}", line=self.line, instruction=self.keyword
        )


def _directives(lines: list[str]) -> tuple[str, int]:
    """The escape character and how many leading lines are parser directives."""
    escape = "\\"
    seen: set[str] = set()
    n = 0
    for line in lines:
        m = _DIRECTIVE.match(line)
        if m is None:
            break
        key = m.group(1).lower()
        if key in seen:
            raise TemplateSpecError(f"Dockerfile line {n + 1}: the parser directive {key!r} is given twice", line=n + 1)
        seen.add(key)
        if key == "escape":
            if m.group(2) not in ("\\", "`"):
                raise TemplateSpecError(
                    f"Dockerfile line {n + 1}: escape must be \\ or ` (got {m.group(2)!r})", line=n + 1
                )
            escape = m.group(2)
        n += 1
    return escape, n


def _ends_continued(line: str, escape: str) -> bool:
    stripped = line.rstrip()
    return stripped.endswith(escape)


def parse(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile, in order."""
    lines = text.replace("\r\n", "\n").split("\n")
    escape, skip = _directives(lines)
    out: list[Instruction] = []
    i = skip
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start = i + 1
        parts: list[str] = []
        while True:
            cur = lines[i]
            if _ends_continued(cur, escape):
                parts.append(cur.rstrip()[: -len(escape)])
                i += 1
                # comment and empty lines inside a continuation are skipped
                while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                    i += 1
                if i >= len(lines):
                    break
                continue
            parts.append(cur)
            i += 1
            break
        out.append(_instruction("".join(parts).strip(), start, escape))
    return out


def _instruction(text: str, line: int, escape: str) -> Instruction:
    m = _KEYWORD.match(text)
    if m is None:
        raise TemplateSpecError(f"Dockerfile line {line}: expected an instruction (e.g. RUN), got {text[:40]!r}",
                                line=line)  # fmt: skip
    keyword = m.group(1).upper()
    rest = text[m.end() :]
    flags: dict[str, str] = {}
    if keyword in FLAGGED:
        while (f := _FLAG.match(rest)) is not None:
            flags[f.group(1)] = f.group(2) if f.group(2) is not None else "true"
            rest = rest[f.end() :]
    exec_form: list[str] | None = None
    if rest.startswith("["):
        try:
            value = json.loads(rest)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            exec_form = value
    ins = Instruction(keyword, rest.strip(), line, flags, exec_form, text, escape)
    if exec_form is None and keyword in ("RUN", "COPY", "ADD") and _HEREDOC.search(rest):
        raise ins.error("heredocs (<<EOF) are not supported: put the script in a file and COPY it, or use RUN with &&")
    return ins


# ---- word expansion (Docker's shell-lexer subset) ----


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str, where: str) -> None:
        self.s = text
        self.pos = 0
        self.env = env
        self.escape = escape
        self.where = where

    def peek(self) -> str:
        return self.s[self.pos] if self.pos < len(self.s) else ""

    def take(self) -> str:
        ch = self.peek()
        self.pos += 1
        return ch

    def words(self, split: bool) -> list[str]:
        words: list[str] = []
        cur: list[str] = []
        started = False
        while self.pos < len(self.s):
            ch = self.take()
            if split and ch.isspace():
                if started:
                    words.append("".join(cur))
                    cur, started = [], False
                continue
            started = True
            if ch == self.escape:
                nxt = self.take()
                cur.append(nxt)
            elif ch == "'":
                cur.append(self.single_quoted())
            elif ch == '"':
                cur.append(self.double_quoted())
            elif ch == "$":
                cur.append(self.dollar())
            else:
                cur.append(ch)
        if started:
            words.append("".join(cur))
        return words

    def single_quoted(self) -> str:
        end = self.s.find("'", self.pos)
        if end < 0:
            raise TemplateSpecError(f"{self.where}: unmatched single quote")
        text = self.s[self.pos : end]
        self.pos = end + 1
        return text

    def double_quoted(self) -> str:
        out: list[str] = []
        while True:
            if self.pos >= len(self.s):
                raise TemplateSpecError(f"{self.where}: unmatched double quote")
            ch = self.take()
            if ch == '"':
                return "".join(out)
            if ch == self.escape and self.peek() in ('"', "$", self.escape):
                out.append(self.take())
            elif ch == "$":
                out.append(self.dollar())
            else:
                out.append(ch)

    def name(self) -> str:
        start = self.pos
        while self.pos < len(self.s) and _NAME_CHARS.match(self.s[self.pos]):
            self.pos += 1
        return self.s[start : self.pos]

    def dollar(self) -> str:
        if self.peek() != "{":
            name = self.name()
            return self.env.get(name, "") if name else "$"
        self.pos += 1
        name = self.name()
        if not name:
            raise TemplateSpecError(f"{self.where}: bad substitution (expected a variable name after '${{')")
        if self.peek() == "}":
            self.pos += 1
            return self.env.get(name, "")
        colon = self.peek() == ":"
        if colon:
            self.pos += 1
        op = self.take()
        if op not in ("-", "+", "?"):
            raise TemplateSpecError(f"{self.where}: unsupported substitution modifier in ${{{name}...}}")
        word = self.until_brace()
        value = self.env.get(name)
        is_set = value is not None and (value != "" or not colon)
        if op == "-":
            return value if is_set and value is not None else word
        if op == "+":
            return word if is_set else ""
        if not is_set or value is None:
            raise TemplateSpecError(f"{self.where}: {name}: {word or 'is not set'}")
        return value

    def until_brace(self) -> str:
        out: list[str] = []
        while True:
            if self.pos >= len(self.s):
                raise TemplateSpecError(f"{self.where}: missing '}}' in a ${{...}} substitution")
            ch = self.take()
            if ch == "}":
                return "".join(out)
            if ch == self.escape:
                out.append(self.take())
            elif ch == "$":
                out.append(self.dollar())
            elif ch == "'":
                out.append(self.single_quoted())
            elif ch == '"':
                out.append(self.double_quoted())
            else:
                out.append(ch)


def expand(text: str, env: Mapping[str, str], *, escape: str = "\\", where: str = "Dockerfile") -> str:
    """One word: substitution and quote removal, whitespace kept."""
    return "".join(_Lexer(text, env, escape, where).words(split=False))


def expand_words(text: str, env: Mapping[str, str], *, escape: str = "\\", where: str = "Dockerfile") -> list[str]:
    """Words split on unquoted whitespace, each substituted and unquoted."""
    return _Lexer(text, env, escape, where).words(split=True)


def key_values(ins: Instruction, env: Mapping[str, str], *, legacy: bool) -> list[tuple[str, str | None]]:
    """``KEY=VALUE ...`` pairs of ENV/LABEL/ARG (``legacy``: ENV's and LABEL's old ``KEY VALUE`` form; ARG's
    ``NAME`` without a value gives ``None``)."""
    where = f"Dockerfile line {ins.line} ({ins.keyword})"
    raw = ins.args
    if not raw:
        raise ins.error("needs at least one argument")
    first = raw.split(None, 1)[0]
    if legacy and "=" not in first:
        rest = raw[len(first) :].strip()
        if not rest:
            raise ins.error(f"{first} needs a value ({ins.keyword} {first}=VALUE)")
        return [(first, expand(rest, env, escape=ins.escape, where=where))]
    out: list[tuple[str, str | None]] = []
    for word in expand_words(raw, env, escape=ins.escape, where=where):
        key, eq, value = word.partition("=")
        if not key:
            raise ins.error(f"{word!r} has no name before '='")
        if not eq and legacy:
            raise ins.error(f"{word!r} is not KEY=VALUE")
        out.append((key, value if eq else None))
    return out
