"""/tmp is part of a container sandbox's files (issue 21.4): snapshots, restores, forks and resets keep or discard
it as they do every other file. A memory-backed /tmp stays available as a daemon setting (``tmp_tmpfs_mb``); its
sandboxes' snapshots and forks are refused with ``not_supported`` instead of silently losing /tmp.

Everything through the SDK against a real daemon, as a user reaches it."""

from __future__ import annotations

from typing import Any

import pytest

from branchbox.sdk import Sandbox
from branchbox.sdk._errors import NotSupportedError
from tests.conftest import DaemonProc

pytestmark = [pytest.mark.root, pytest.mark.template]

NOTE = "/tmp/agent-notes/plan.txt"


def _tmp_mount(sbx: Sandbox) -> str:
    """The /proc/mounts line of /tmp inside the sandbox ('' when /tmp is no mount of its own)."""
    out = sbx.commands.run("awk '$2 == \"/tmp\"' /proc/mounts").stdout
    return str(out).strip()


def _read(sbx: Sandbox, path: str = NOTE) -> str:
    return str(sbx.commands.run(f"cat {path} 2>/dev/null || echo MISSING").stdout).strip()


def test_tmp_is_a_directory_of_the_sandboxs_files(daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=daemon.url) as sbx:
        assert _tmp_mount(sbx) == "", "/tmp should be a plain directory of the overlay root, not a mount"
        assert str(sbx.commands.run("stat -c %a /tmp").stdout).strip() == "1777"
        # sticky and world-writable: an unprivileged user writes there, and cannot remove root's file
        r = sbx.commands.run(
            'echo root > /tmp/r && python3 -c "import os; os.setgid(65534); os.setuid(65534); '
            "open('/tmp/n', 'w').write('n'); os.remove('/tmp/r')\"; ls /tmp"
        )
        assert r.stdout.split() == ["n", "r"] and "PermissionError" in str(r.stderr), r


def test_tmp_survives_snapshot_restore_fork_and_reset_to_a_snapshot(daemon: DaemonProc) -> None:
    made: list[Sandbox] = []
    try:
        sbx = Sandbox.create(base_url=daemon.url)
        made.append(sbx)
        sbx.commands.run(f"mkdir -p /tmp/agent-notes && echo step-1 > {NOTE} && ln -s plan.txt /tmp/agent-notes/ln")
        snap = sbx.create_snapshot(name="tmp-kept")

        restored = Sandbox.create(snapshot=snap.snapshot_id, base_url=daemon.url)
        made.append(restored)
        assert _read(restored) == "step-1"
        assert _read(restored, "/tmp/agent-notes/ln") == "step-1"

        sbx.commands.run(f"echo step-2 > {NOTE}")
        kids = sbx.fork(count=3)
        made.extend(k for k in kids if isinstance(k, Sandbox))
        assert all(isinstance(k, Sandbox) for k in kids), kids
        assert [_read(k) for k in kids if isinstance(k, Sandbox)] == ["step-2"] * 3
        # the children's /tmp is their own: a write in one is seen by no other
        first = kids[0]
        assert isinstance(first, Sandbox)
        first.commands.run(f"echo child > {NOTE}")
        assert _read(sbx) == "step-2" and _read(first) == "child"

        sbx.commands.run(f"echo step-3 > {NOTE}")
        sbx.reset(snap.snapshot_id)
        assert _read(sbx) == "step-1", "reset to a snapshot brings back the snapshot's /tmp"
        sbx.reset()
        assert _read(sbx) == "MISSING", "reset to the template clears /tmp"
        assert str(sbx.commands.run("stat -c %a /tmp").stdout).strip() == "1777"
    finally:
        for s in made:
            s.kill()
            s.close()


@pytest.fixture
def tmpfs_daemon(daemon_factory: Any) -> DaemonProc:
    d: DaemonProc = daemon_factory(env={"BRANCHBOX_TMP_TMPFS_MB": "8"})
    return d


def test_memory_backed_tmp_is_an_option_and_refuses_snapshots(tmpfs_daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=tmpfs_daemon.url) as sbx:
        line = _tmp_mount(sbx)
        assert line.startswith("tmpfs /tmp tmpfs") and "size=8192k" in line, line
        full = sbx.commands.run("head -c 9M /dev/zero > /tmp/big; echo rc=$?")
        assert "No space left on device" in str(full.stderr) and "rc=1" in str(full.stdout), full
        sbx.commands.run(f"rm /tmp/big && mkdir -p /tmp/agent-notes && echo kept > {NOTE}")
        for call in (sbx.create_snapshot, sbx.fork):
            with pytest.raises(NotSupportedError, match="tmp_tmpfs_mb = 0") as exc:
                call()
            assert exc.value.code == "not_supported"
        assert _read(sbx) == "kept", "a refused snapshot changes nothing"
        assert Sandbox.snapshots(base_url=tmpfs_daemon.url) == []
        assert len(Sandbox.list(base_url=tmpfs_daemon.url)) == 1
