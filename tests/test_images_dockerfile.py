"""Templates from Dockerfiles (issue 25): `branchbox template build -f`, `Template.build` and `POST /v1/templates`
against a real daemon; RUN steps run in real sandboxes. Plus the pure parts (parser, word expansion,
.dockerignore) as unit tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from branchbox.errors import TemplateSpecError
from branchbox.images.dockerfile_parse import expand, expand_words, key_values, parse
from branchbox.images.store import TemplateStore
from branchbox.sdk import BadRequestError, Sandbox, SandboxError, Template, TemplateNotFoundError
from branchbox.sdk._context import DockerIgnore, pack_context
from tests.conftest import DaemonProc, cli_env, templates_dir
from tests.oci_images import registry, write_layout

# ---------------------------------------------------------------------------------------------- pure logic


def test_parse_continuations_comments_forms_and_flags() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM base AS one\n"
        "\n"
        "# a comment\n"
        "RUN echo a \\\n"
        "  # inside a continuation\n"
        "  && echo b\n"
        'CMD ["sleep", "1"]\n'
        "COPY --chown=app:app --chmod=755 a b /dst/\n"
        "run lower case\n"
    )
    ins = parse(text)
    assert [(i.keyword, i.line) for i in ins] == [("FROM", 2), ("RUN", 5), ("CMD", 8), ("COPY", 9), ("RUN", 10)]
    assert ins[1].args == "echo a   && echo b"
    assert ins[1].exec_form is None
    assert ins[2].exec_form == ["sleep", "1"]
    assert ins[3].flags == {"chown": "app:app", "chmod": "755"}
    assert ins[3].args == "a b /dst/"


def test_parse_escape_directive_and_heredoc_refused() -> None:
    ins = parse("# escape=`\nFROM x\nRUN echo a `\n  b\n")
    assert ins[1].args == "echo a   b"
    assert ins[1].escape == "`"
    with pytest.raises(TemplateSpecError, match=r"line 2.*heredocs"):
        parse("FROM x\nRUN <<EOF\necho\nEOF\n")


def test_expand_like_docker() -> None:
    env = {"A": "1", "EMPTY": "", "P": "/srv"}
    assert expand("$A-${A}", env) == "1-1"
    assert expand("${UNSET:-dflt} ${EMPTY:-e} ${EMPTY-e} ${A:+set} ${UNSET:+x}", env) == "dflt e  set "
    assert expand("'$A' \"$A\" \\$A", env) == "$A 1 $A"
    assert expand_words('$P/x "two words" a\\ b', env) == ["/srv/x", "two words", "a b"]
    with pytest.raises(TemplateSpecError, match="must be set"):
        expand("${UNSET:?must be set}", env)
    # all substitutions of one ENV use the values from before it
    (ins,) = parse("ENV A=2 B=$A\n")
    assert key_values(ins, env, legacy=True) == [("A", "2"), ("B", "1")]
    (legacy,) = parse("ENV NAME some value\n")
    assert key_values(legacy, {}, legacy=True) == [("NAME", "some value")]


def test_dockerignore_rules() -> None:
    ig = DockerIgnore("# c\n*.log\nbuild\n**/secret*\n!keep.log\ndocs/**/*.md\n")
    assert ig.excluded("x.log") and not ig.excluded("keep.log") and not ig.excluded("a/x.log")
    assert ig.excluded("build") and ig.excluded("build/out/bin")
    assert ig.excluded("secret.txt") and ig.excluded("a/b/secret-key")
    assert ig.excluded("docs/a/b/c.md") and ig.excluded("docs/c.md") and not ig.excluded("docs/c.txt")


def test_pack_context_applies_dockerignore_and_keeps_symlinks(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM default\n")
    (tmp_path / ".dockerignore").write_text("*.log\nnode_modules\n")
    (tmp_path / "app.py").write_text("print(1)\n")
    (tmp_path / "debug.log").write_text("x")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "dep.js").write_text("x")
    os.symlink("/etc/shadow", tmp_path / "evil")
    packed, inside = pack_context(tmp_path)
    with packed, tarfile.open(fileobj=packed) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert inside == "Dockerfile"
    assert set(members) == {"Dockerfile", ".dockerignore", "app.py", "evil"}
    assert members["evil"].issym() and members["evil"].linkname == "/etc/shadow"


def test_copy_and_add_sizes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What one step stages on the host is bounded (a gzip bomb in the context or in an ADD archive)."""
    from branchbox.images import dockerfile_context as dc

    src = tmp_path / "big.bin"
    src.write_bytes(b"\0" * 4096)
    ctx_tar = tmp_path / "ctx.tar.gz"
    with tarfile.open(ctx_tar, "w:gz") as tar:
        tar.add(src, arcname="big.bin")
    inner = tmp_path / "inner.tar"
    with tarfile.open(inner, "w") as tar:
        tar.add(src, arcname="big.bin")
    monkeypatch.setattr(dc, "MAX_STEP_BYTES", 1024)
    ctx = dc.Context(ctx_tar)
    try:
        with pytest.raises(TemplateSpecError, match="larger than"):
            ctx.pack([dc.Source("big.bin", "big.bin", ctx.members["big.bin"])])
    finally:
        ctx.close()
    with tarfile.open(inner) as archive, pytest.raises(TemplateSpecError, match="ADD archive is larger"):
        dc.repack_archive(archive)


# ---------------------------------------------------------------------------------------------- daemon


def _context(root: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def _cli(daemon: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "branchbox.cli", "--url", daemon.url, *args],
        env=cli_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )


class _Log:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events if e["type"] in ("cached", "running")]

    def output(self) -> str:
        return "".join(e["data"] for e in self.events if e["type"] == "log")


def _nothing_left(daemon: DaemonProc, name: str) -> None:
    """No sandbox, no snapshot, no template of that name: a failed build leaves nothing behind."""
    assert Sandbox.list(base_url=daemon.url) == []
    assert Sandbox.snapshots(base_url=daemon.url) == []
    assert name not in [t.name for t in Sandbox.templates(base_url=daemon.url)]
    assert not list((daemon.data_dir / "build-contexts").glob("*"))


@pytest.fixture
def names() -> Any:
    made: list[str] = []

    def new(prefix: str = "df") -> str:
        made.append(f"{prefix}-{secrets.token_hex(4)}")
        return made[-1]

    def track(name: str) -> str:
        made.append(name)
        return name

    new.track = track  # type: ignore[attr-defined]
    yield new
    store = TemplateStore(templates_dir())
    for n in made:
        with contextlib.suppress(LookupError):
            store.remove(n)


DOCKERFILE = """\
ARG BASE=default
FROM ${BASE}
ARG GREETING=hi
RUN useradd -m builder && echo "built with $GREETING" > /built.txt && echo step-output-$GREETING
ENV APP_HOME=/srv/app GREETING_ENV=${GREETING}
WORKDIR $APP_HOME
COPY app/ ./data/
COPY --chown=builder:builder tool.sh /usr/local/bin/
RUN ["/bin/sh", "-c", "ls data > listing.txt && chmod 0755 /usr/local/bin/tool.sh"]
USER builder
LABEL purpose=test
CMD ["sleep", "infinity"]
"""


def test_build_run_cache_and_rebuild(daemon: DaemonProc, tmp_path: Path, names: Any) -> None:
    ctx = _context(tmp_path / "ctx", DOCKERFILE, {"app/hello.txt": "hello v1\n", "tool.sh": "#!/bin/sh\necho tool\n"})
    name = names()
    # 1. the CLI, cold: every step runs, RUN output streams, build arg applied
    proc = _cli(daemon, "template", "build", "-f", str(ctx / "Dockerfile"), "--build-arg", "GREETING=hello",
                "--name", name, str(ctx))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Step 1/11 : FROM ${BASE}" in proc.stderr
    assert "step-output-hello" in proc.stderr
    assert "CACHED" not in proc.stderr.split("Step 2/11")[1]
    assert proc.stdout.startswith(name + " ")

    # 2. a sandbox from it sees the files, env, user and workdir (through the SDK)
    with Sandbox.create(template=name, base_url=daemon.url) as sbx:
        r = sbx.commands.run(
            "id -un; pwd; echo $GREETING_ENV; cat /built.txt; cat data/hello.txt; cat listing.txt; "
            "stat -c '%U %a' /usr/local/bin/tool.sh; tool.sh"
        )
        assert r.exit_code == 0, r.stderr
        assert r.stdout.split("\n")[:8] == [
            "builder", "/srv/app", "hello", "built with hello", "hello v1", "hello.txt", "builder 755", "tool",
        ]  # fmt: skip
        assert sbx.commands.run("id -un", user="root").stdout.strip() == "root"

    # 3. the same build again (SDK): every step CACHED, the same template
    log = _Log()
    again = Template.build(ctx, name=name, build_args={"GREETING": "hello"}, on_event=log, base_url=daemon.url)
    assert log.kinds() == ["cached"] * 11
    assert again.digest == proc.stdout.split()[1]

    # 4. a changed COPY source reruns from that step (steps before it stay cached)
    (ctx / "app" / "hello.txt").write_text("hello v2\n")
    log = _Log()
    changed = Template.build(ctx, name=name, build_args={"GREETING": "hello"}, on_event=log, base_url=daemon.url)
    assert log.kinds() == ["cached"] * 5 + ["running"] * 6
    assert changed.digest != again.digest
    with Sandbox.create(template=name, base_url=daemon.url) as sbx:
        assert sbx.commands.run("cat data/hello.txt").stdout == "hello v2\n"
    assert Sandbox.list(base_url=daemon.url) == []
    assert Sandbox.snapshots(base_url=daemon.url) == []


def test_failing_run_says_line_exit_code_and_output(daemon: DaemonProc, tmp_path: Path, names: Any) -> None:
    name = names()
    ctx = _context(tmp_path, "FROM default\nRUN echo boom-output; echo to-stderr >&2; exit 3\n")
    log = _Log()
    with pytest.raises(SandboxError) as info:
        Template.build(ctx, name=name, on_event=log, base_url=daemon.url)
    exc = info.value
    assert exc.code == "template_build_failed"
    assert "line 2" in exc.message and "exit code 3" in exc.message
    assert "boom-output" in exc.message and "to-stderr" in exc.message
    assert exc.details["exit_code"] == 3 and exc.details["line"] == 2
    assert "boom-output" in log.output()
    _nothing_left(daemon, name)
    proc = _cli(daemon, "template", "build", "--name", name, str(ctx))
    assert proc.returncode == 1
    assert "template_build_failed" in proc.stderr and "boom-output" in proc.stderr


@pytest.mark.parametrize(
    ("dockerfile", "error", "match"),
    [
        ("FROM no-such-template\nRUN true\n", TemplateNotFoundError, "line 1.*no-such-template"),
        ("FROM docker://127.0.0.1:9/nothing:1\n", SandboxError, r"line 1 \(FROM\)"),
        ("FROM default\nONBUILD RUN true\n", BadRequestError, "line 2 \\(ONBUILD\\)"),
        ("FROM default\nFROBNICATE x\n", BadRequestError, "line 2.*unknown instruction FROBNICATE"),
        ("FROM default\nRUN true\nFROM default\n", BadRequestError, "line 3.*multi-stage"),
        ("FROM default\nCOPY --from=x /a /b\n", BadRequestError, "multi-stage"),
        ("FROM default\nADD https://example.com/x /x\n", BadRequestError, "ADD of a URL"),
        ("RUN true\n", BadRequestError, "must start with FROM"),
        ("FROM default\nCOPY missing.txt /x\n", BadRequestError, "not in the build context"),
    ],
)
def test_bad_dockerfiles(
    daemon: DaemonProc, tmp_path: Path, names: Any, dockerfile: str, error: type[Exception], match: str
) -> None:
    name = names()
    ctx = _context(tmp_path, dockerfile)
    with pytest.raises(error, match=match):
        Template.build(ctx, name=name, base_url=daemon.url)
    _nothing_left(daemon, name)


def test_copy_cannot_leave_the_context(daemon: DaemonProc, tmp_path: Path, names: Any) -> None:
    """The attack: a source that climbs out with .., a symlink to a host file, a symlinked directory to /etc.
    Each is an error; the host's files never reach the template. A symlink inside the context still works."""
    (tmp_path / "outside.txt").write_text("host secret\n")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "real.txt").write_text("inside\n")
    os.symlink("/etc/shadow", ctx / "evil")
    os.symlink("/etc", ctx / "evildir")
    os.symlink("../outside.txt", ctx / "climb")
    os.symlink("real.txt", ctx / "good")
    for src in ("../outside.txt", "evil", "evildir/passwd", "climb"):
        name = names()
        (ctx / "Dockerfile").write_text(f"FROM default\nCOPY {src} /stolen\n")
        with pytest.raises(BadRequestError, match=r"outside the build context|not in the build context"):
            Template.build(ctx, name=name, base_url=daemon.url)
        _nothing_left(daemon, name)
    name = names()
    (ctx / "Dockerfile").write_text("FROM default\nCOPY good /copied\n")
    Template.build(ctx, name=name, base_url=daemon.url)
    with Sandbox.create(template=name, base_url=daemon.url) as sbx:
        assert sbx.commands.run("cat /copied").stdout == "inside\n"


def test_add_local_tar_extracts_and_dockerignore_applies(daemon: DaemonProc, tmp_path: Path, names: Any) -> None:
    ctx = _context(tmp_path / "ctx", "FROM default\nADD bundle.tar.gz /opt/\nCOPY . /ctx/\n",
                   {"keep.txt": "k\n", "skip.log": "s\n", ".dockerignore": "*.log\n"})  # fmt: skip
    src = tmp_path / "bundle"
    src.mkdir()
    (src / "inner.txt").write_text("from the tar\n")
    with tarfile.open(ctx / "bundle.tar.gz", "w:gz") as tar:
        tar.add(src / "inner.txt", arcname="pkg/inner.txt")
    name = names()
    Template.build(ctx, name=name, base_url=daemon.url)
    with Sandbox.create(template=name, base_url=daemon.url) as sbx:
        assert sbx.commands.run("cat /opt/pkg/inner.txt").stdout == "from the tar\n"
        listing = sbx.commands.run("ls -A /ctx").stdout.split()
        assert "keep.txt" in listing and "skip.log" not in listing and "Dockerfile" in listing


def test_http_api_streams_ndjson_and_refuses_bad_input(daemon: DaemonProc, tmp_path: Path, names: Any) -> None:
    name = names()
    ctx = _context(tmp_path, "FROM default\nRUN echo over-http\n")
    packed, inside = pack_context(ctx)
    with packed:
        body = packed.read()
    params = {"name": name, "dockerfile": inside}
    with httpx.stream("POST", daemon.url + "/v1/templates", params=params, content=body, timeout=300) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = [line for line in resp.iter_lines() if line]
    assert '"over-http\\n"' in "".join(lines)
    assert lines[-1].startswith('{"type":"done"')
    bad = httpx.post(daemon.url + "/v1/templates", params=params, content=b"not a tar", timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_template_spec"
    bad = httpx.post(daemon.url + "/v1/templates", params={**params, "build_arg": "novalue"}, content=body)
    assert bad.status_code == 400 and "KEY=VALUE" in bad.json()["error"]["message"]
    bad = httpx.post(daemon.url + "/v1/templates", params={**params, "name": "Bad/Name"}, content=body)
    assert bad.status_code == 400
    assert not list((daemon.data_dir / "build-contexts").glob("*"))


@pytest.mark.parametrize("gone_at", ["running", "started"])
def test_client_going_away_stops_the_build(daemon: DaemonProc, tmp_path: Path, names: Any, gone_at: str) -> None:
    """A client that disconnects while the RUN step's sandbox boots ("running") or while its command runs
    ("started") cancels the build: the sandbox is destroyed, no template is made, the spooled context is
    deleted."""
    name = names()
    ctx = _context(tmp_path, "FROM default\nRUN echo started; sleep 600\n")
    packed, inside = pack_context(ctx)
    with packed:
        body = packed.read()
    params = {"name": name, "dockerfile": inside}
    with httpx.stream("POST", daemon.url + "/v1/templates", params=params, content=body, timeout=300) as resp:
        for line in resp.iter_lines():
            event = json.loads(line)
            if event["type"] == gone_at or (event["type"] == "log" and gone_at in event["data"]):
                break
    deadline = time.monotonic() + 120
    while Sandbox.list(base_url=daemon.url) and time.monotonic() < deadline:  # the daemon cleans up after the fact
        time.sleep(0.2)
    _nothing_left(daemon, name)


def test_from_an_image_reference_imports_it_once(
    daemon: DaemonProc, tmp_path: Path, names: Any, busybox_rootfs_tar: Path
) -> None:
    """FROM an image in a registry (a busybox-only rootfs: no python, no libc, pushed to a docker-registry on
    loopback, which the tests' daemons allow like their git servers) imports it as a template (image-<hash>) once;
    RUN runs in a sandbox of it; the rebuild is all CACHED without importing again. Over the API, FROM cannot
    read the daemon host's files (oci:, docker-archive:, ...) or its Docker daemon."""
    layout = tmp_path / "layout"
    write_layout(layout, [busybox_rootfs_tar.read_bytes()], config={"Env": ["FROM_IMAGE=yes"]})
    with registry(tmp_path / "registry") as reg:
        reg.push(f"oci:{layout}:latest", "busybox:1")
        ref = f"{reg.host}/busybox:1"  # Docker's form: docker:// implied
        auto = names.track("image-" + hashlib.sha256(f"docker://{ref}".encode()).hexdigest()[:16])
        name = names()
        ctx = _context(tmp_path / "ctx", f"FROM {ref}\nRUN echo from-busybox > /made && echo $FROM_IMAGE\nUSER app\n")
        log = _Log()
        Template.build(ctx, name=name, on_event=log, base_url=daemon.url)
        assert f"importing docker://{ref} as template {auto}" in log.output()
        assert "yes\n" in log.output()
        with Sandbox.create(template=name, base_url=daemon.url) as sbx:
            r = sbx.commands.run("cat /made; id -un; echo $FROM_IMAGE")
            assert r.stdout == "from-busybox\napp\nyes\n", r.stderr
        log = _Log()
        Template.build(ctx, name=name, on_event=log, base_url=daemon.url)
        assert log.kinds() == ["cached"] * 3
        assert "importing" not in log.output()
    for bad in (f"oci:{layout}", f"docker-archive:{tmp_path}/x.tar", "docker-daemon:busybox:1"):
        with pytest.raises(BadRequestError, match=r"line 1 \(FROM\).*registry images only") as info:
            Template.build(_context(tmp_path / "bad", f"FROM {bad}\n"), name=name, base_url=daemon.url)
        assert info.value.details["line"] == 1
    _nothing_left(daemon, "no-such-template-made")


def test_stale_spooled_contexts_are_removed(daemon: DaemonProc, tmp_path: Path, names: Any) -> None:
    """A context spooled by a build the daemon never finished (killed in the middle) goes with the next build."""
    stale = daemon.data_dir / "build-contexts" / ".build-context-stale"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"left by a killed daemon")
    Template.build(_context(tmp_path, "FROM default\n"), name=names(), base_url=daemon.url)
    assert not list(stale.parent.iterdir())
