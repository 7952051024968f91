"""Git workspaces through a real daemon: HTTP routes, the seed's agent route, SDK (sync + async), CLI."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest

from branchbox import sdk
from branchbox.sdk._workspaces import clone_command
from branchbox.workspaces.testing import GitDaemon
from tests.conftest import DaemonProc
from tests.test_cli import bb
from tests.test_workspaces import git_base, git_daemon  # noqa: F401 - session fixtures shared with that module

pytestmark = [pytest.mark.root, pytest.mark.template]


def test_clone_command_keeps_credentials_out_of_argv() -> None:
    argv, env = clone_command("https://bob:tok-123456@h.example/o/r.git", "/w/r", branch="dev", depth=1, token=None)
    assert argv == ["git", "clone", "-q", "--branch", "dev", "--depth=1", "--", "https://h.example/o/r.git", "/w/r"]
    assert env["GIT_CONFIG_VALUE_0"] == "Authorization: Basic " + base64.b64encode(b"bob:tok-123456").decode()
    argv, env = clone_command("https://h.example/o/r.git", None, branch=None, depth=None, token="tok-9")
    assert (
        "tok-9" not in " ".join(argv)
        and "x-access-token:tok-9" in base64.b64decode(env["GIT_CONFIG_VALUE_0"].split()[-1]).decode()
    )
    assert clone_command("/local/repo", "/x", branch=None, depth=None, token=None)[1] == {"GIT_TERMINAL_PROMPT": "0"}


def test_http_sdk_and_cli(daemon: DaemonProc, git_daemon: GitDaemon) -> None:  # noqa: F811
    url = git_daemon.url("repo.git")
    with httpx.Client(base_url=daemon.url, timeout=300) as c:
        r = c.post("/v1/workspaces", json={"repository_url": url, "branch": "main"})
        assert r.status_code == 201, r.text
        ws: dict[str, Any] = r.json()
        assert ws["status"] == "ready" and ws["sandbox_id"] and len(ws["commit"]) == 40 and not ws["cached"]
        assert {"fetch", "checkout", "sandbox", "total"} <= set(ws["timings"])
        cmd = ["sh", "-c", "git status --porcelain; git log -1 --format=%H"]
        run = c.post(f"/v1/sandboxes/{ws['sandbox_id']}/commands", json={"cmd": cmd, "cwd": ws["path"]})
        assert run.json()["stdout"] == ws["commit"] + "\n"
        assert c.get(f"/v1/workspaces/{ws['id']}").json()["id"] == ws["id"]
        assert [w["id"] for w in c.get("/v1/workspaces").json()] == [ws["id"]]
        # the seed's route and body
        seed = c.post("/api/v1/agent/workspaces", json={"repository_url": url, "branch": "main",
                                                         "base_image": "default"})  # fmt: skip
        assert seed.status_code == 201 and seed.json()["cached"] and seed.json()["commit"] == ws["commit"]
        # errors keep their codes over HTTP
        bad = c.post("/v1/workspaces", json={"repository_url": "file:///etc", "branch": "main"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_repository_url"
        # the host's git obeys the blocked ranges (the cloud's metadata service here; loopback is allowed for the
        # tests' own git servers by BRANCHBOX_GIT_ALLOW_CIDRS)
        meta = c.post("/v1/workspaces", json={"repository_url": "http://169.254.169.254/x.git", "branch": "main"})
        assert meta.status_code == 400 and meta.json()["error"]["code"] == "invalid_repository_url"
        assert "git_allow_cidrs" in meta.json()["error"]["message"]
        missing = c.post("/v1/workspaces", json={"repository_url": url, "branch": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "ref_not_found"
        assert c.get("/v1/workspaces/ws-none").json()["error"]["code"] == "workspace_not_found"
        assert c.delete(f"/v1/workspaces/{ws['id']}").status_code == 204
        assert c.get(f"/v1/sandboxes/{ws['sandbox_id']}").status_code == 404
        assert c.delete(f"/v1/workspaces/{seed.json()['id']}").status_code == 204

    # SDK, sync: Workspace.create; sbx.git.clone inside the sandbox (a local clone: sandboxes have no network)
    with sdk.Workspace.create(url, branch="main", base_url=daemon.url) as w:
        assert w.info.cached and w.path == "/workspace/repo"
        res = w.sandbox.commands.run("git status --porcelain && git rev-parse HEAD", cwd=w.path)
        assert res.stdout == f"{w.commit}\n"
        cloned = w.sandbox.git.clone(w.path, "/root/copy")
        assert cloned.exit_code == 0
        assert w.sandbox.commands.run("git -C /root/copy rev-parse HEAD").stdout == f"{w.commit}\n"
        wid = w.workspace_id
    with pytest.raises(sdk.NotFoundError) as ei:
        sdk.Workspace.get(wid, base_url=daemon.url)
    assert ei.value.code == "workspace_not_found"
    with pytest.raises(sdk.NotFoundError) as ei2:
        sdk.Workspace.create(url, branch="no-such", base_url=daemon.url)
    assert ei2.value.code == "ref_not_found"

    # SDK, async
    async def use_async() -> str:
        async with await sdk.AsyncWorkspace.create(url, branch="main", path="/root/a", base_url=daemon.url) as aw:
            sbx = await aw.sandbox()
            out = await sbx.commands.run("git status --porcelain; pwd", cwd=aw.path)
            return out.stdout

    assert asyncio.run(use_async()) == "/root/a\n"

    # CLI
    made = bb("workspace", "create", url, "--branch", "main", "--json", url=daemon.url)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["status"] == "ready" and info["cached"]
    ls = bb("workspace", "ls", url=daemon.url)
    assert info["workspace_id"] in ls.stdout and "ready" in ls.stdout
    assert bb("workspace", "rm", info["workspace_id"], url=daemon.url).returncode == 0
    gone = bb("workspace", "rm", info["workspace_id"], url=daemon.url)
    assert gone.returncode == 1 and "workspace_not_found" in gone.stderr
    bad = bb("workspace", "create", "ftp://x/y", url=daemon.url)
    assert bad.returncode == 1 and "invalid_repository_url" in bad.stderr
