"""Per-sandbox host uid ranges (issue 22.1), reached as a user reaches them: the SDK against a real daemon.

Each container sandbox (each warm pool member, each fork child) maps its root to a host uid range of its own,
carved from the block its daemon claimed host-wide (``DATA/host.json``: uid_first, uid_ranges). Template trees stay
owned by the canonical range on disk and reach each sandbox through idmapped mounts; a sandbox's upper dir is
written in its own range; a snapshot layer keeps its writer's range and a fork or restore reads it idmapped.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from branchbox import Sandbox
from branchbox.backends.idranges import CANONICAL_BASE, RANGE_SIZE
from branchbox.sdk import RateLimitError
from tests.conftest import DaemonProc

pytestmark = [pytest.mark.root]


def _run(sbx: Sandbox, cmd: str, **kw: object) -> str:
    res = sbx.commands.run(cmd, **kw)  # type: ignore[call-overload]
    assert res.exit_code == 0, (cmd, res.stdout, res.stderr)
    return str(res.stdout).strip()


def _base(sbx: Sandbox) -> int:
    """The host uid of the sandbox's root, from its own uid map (and the gid map says the same)."""
    uid_map = _run(sbx, "cat /proc/self/uid_map").split()
    assert uid_map[0] == "0" and uid_map[2] == str(RANGE_SIZE), uid_map
    assert _run(sbx, "cat /proc/self/gid_map").split() == uid_map
    return int(uid_map[1])


def _block(d: DaemonProc) -> range:
    names = json.loads((d.data_dir / "host.json").read_text())
    first, n = names["uid_first"], names["uid_ranges"]
    return range(first, first + n * RANGE_SIZE, RANGE_SIZE)


def _upper(d: DaemonProc, sbx: Sandbox) -> Path:
    """The sandbox's upper dir on the host (``fs/upper`` on btrfs, ``upper`` with the overlay driver)."""
    sdir = d.data_dir / "sandboxes" / sbx.sandbox_id
    return sdir / "fs" / "upper" if (sdir / "fs").is_dir() else sdir / "upper"


def _in_range(uid: int, base: int) -> bool:
    return base <= uid < base + RANGE_SIZE


def test_sandboxes_map_to_disjoint_ranges_of_the_block(daemon: DaemonProc) -> None:
    block = _block(daemon)
    with Sandbox.create(base_url=daemon.url) as a, Sandbox.create(base_url=daemon.url) as b:
        ra, rb = _base(a), _base(b)
        assert ra != rb and ra in block and rb in block
        assert CANONICAL_BASE not in (ra, rb)
        # the template (owned by the canonical range on disk) reaches each through an idmapped mount: same owners
        for sbx in (a, b):
            assert _run(sbx, "stat -c %u:%g /etc/passwd /etc/shadow /usr/bin/su").split() == ["0:0", "0:42", "0:0"]
            assert _run(sbx, "stat -c %a /usr/bin/su") == "4755"
        _run(a, "mkdir -p /opt/a && echo a > /opt/a/f && chown 1000:1000 /opt/a/f && cp /bin/sh /opt/a/suid && "
                "chmod 4755 /opt/a/suid && echo x >> /etc/passwd")  # fmt: skip
        upper = _upper(daemon, a)
        owners = {p: os.lstat(upper / p) for p in ("opt/a", "opt/a/f", "opt/a/suid", "etc/passwd")}
        assert owners["opt/a/f"].st_uid == ra + 1000 and owners["opt/a/f"].st_gid == ra + 1000
        assert owners["etc/passwd"].st_uid == ra  # a copy-up: root-owned inside, A's root on the host
        for st in owners.values():  # nothing A made is owned by any uid of B (or of the template) on the host
            assert _in_range(st.st_uid, ra) and not _in_range(st.st_uid, rb)
            assert not _in_range(st.st_uid, CANONICAL_BASE)
        # B's processes (host uids of its own range) do not own A's setuid binary
        assert _run(b, "id -u; cat /proc/1/status | grep ^Uid").startswith("0")
        # the template on disk is untouched (still canonical) and B does not see A's change
        assert "x" not in _run(b, "tail -c 2 /etc/passwd")


def test_fork_and_restore_get_ranges_of_their_own_with_the_parents_owners(daemon: DaemonProc) -> None:
    with Sandbox.create(base_url=daemon.url) as parent:
        rp = _base(parent)
        _run(parent, "useradd --uid 1234 --user-group --create-home agent && echo hi > /home/agent/f && "
                     "chown agent:agent /home/agent/f && chmod 640 /home/agent/f")  # fmt: skip
        children = parent.fork(count=2)
        try:
            assert all(isinstance(c, Sandbox) for c in children), children
            kids = [c for c in children if isinstance(c, Sandbox)]
            ranges = {rp, *(_base(c) for c in kids)}
            assert len(ranges) == 3, ranges
            for c in kids:
                # the parent's layer (owned by its range on disk) reads with the owners the parent wrote
                assert _run(c, "stat -c %u:%g:%a /home/agent/f /home/agent") == "1234:1234:640\n1234:1234:755"
                assert _run(c, "cat /home/agent/f", user="agent") == "hi"
                _run(c, "echo more >> /home/agent/f", user="agent")  # copy-up into the child's own range
                st = os.lstat(_upper(daemon, c) / "home/agent/f")
                assert st.st_uid == _base(c) + 1234 and st.st_gid == _base(c) + 1234
            snap = parent.create_snapshot()
            with Sandbox.create(base_url=daemon.url, snapshot=snap.snapshot_id) as restored:
                assert _base(restored) not in ranges
                assert _run(restored, "stat -c %U:%G /home/agent/f; cat /home/agent/f") == "agent:agent\nhi"
        finally:
            for c in children:
                if isinstance(c, Sandbox):
                    c.kill()


POOL = """
[pools.default]
min_size = 2
target_free = 2
max_size = 2
memory_mb = 128
"""


def _wait_pool(d: DaemonProc, ready: int) -> None:
    import time

    deadline = time.monotonic() + 120
    while httpx.get(f"{d.url}/v1/pools/default", timeout=30).json().get("ready", 0) < ready:
        assert time.monotonic() < deadline, "the pool did not fill"
        time.sleep(0.2)


def test_warm_pool_members_get_ranges_of_their_own(daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(config=POOL)
    _wait_pool(d, 2)
    with Sandbox.create(base_url=d.url, memory_mb=128) as a, Sandbox.create(base_url=d.url, memory_mb=128) as b:
        assert a.get_info().source == "warm" and b.get_info().source == "warm"
        assert _base(a) != _base(b)
        assert {_base(a), _base(b)} <= set(_block(d))
        assert _run(a, "stat -c %u /etc/passwd") == "0"


def _ranges_in_store(d: DaemonProc) -> list[int]:
    db = sqlite3.connect(d.data_dir / "state.db")
    try:
        return sorted(r[0] for r in db.execute("SELECT uid_base FROM sandboxes"))
    finally:
        db.close()


def test_a_full_block_refuses_clearly_recycles_after_destroy_and_survives_a_restart(daemon_factory: Any) -> None:
    # 18 ranges: 16 lent to the zygote's spare shells, 2 free; each claimed spare range is replaced while any is free
    d: DaemonProc = daemon_factory(keep=True, config="uid_ranges = 18\n")
    boxes: list[Sandbox] = []
    try:
        for _ in range(18):
            boxes.append(Sandbox.create(base_url=d.url, timeout=600))
        with pytest.raises(RateLimitError, match="no free uid range"):
            Sandbox.create(base_url=d.url)
        bases = [_base(b) for b in boxes]
        assert len(set(bases)) == 18 and set(bases) == set(_block(d))
        # a restart keeps every range in use (the store names them) and lends none of them twice
        d.stop()
        d.start()
        assert sorted(_base(b) for b in boxes) == sorted(bases)
        with pytest.raises(RateLimitError, match="no free uid range"):
            Sandbox.create(base_url=d.url)
        # destroyed: its processes and upper dir are gone, and only then its range serves again
        gone = boxes.pop(0)
        freed = bases[0]
        gone.kill()
        assert not (d.data_dir / "sandboxes" / gone.sandbox_id).exists()
        with Sandbox.create(base_url=d.url) as again:
            assert _base(again) == freed
        assert freed not in _ranges_in_store(d)
    finally:
        for b in boxes:
            b.kill()


def test_sandboxes_of_an_older_daemon_keep_working_after_the_upgrade(daemon_factory: Any) -> None:
    # uid_ranges = 0 is the daemon before issue 22.1: every sandbox in the canonical range
    d: DaemonProc = daemon_factory(keep=True, config="uid_ranges = 0\n")
    old = Sandbox.create(base_url=d.url, timeout=600)
    try:
        assert _base(old) == CANONICAL_BASE
        _run(old, "echo old > /opt/f && chown 7:7 /opt/f")
        snap = old.create_snapshot(name="before-upgrade")
        d.stop()
        assert d.config_path is not None
        d.config_path.write_text("")  # the new default: a block of ranges
        d.start()
        assert _base(old) == CANONICAL_BASE and _run(old, "cat /opt/f") == "old"
        with Sandbox.create(base_url=d.url, snapshot=snap.snapshot_id) as new:
            assert _base(new) in set(_block(d))
            assert _run(new, "stat -c %u:%g /opt/f; cat /opt/f") == "7:7\nold"
        kids = old.fork(count=1)
        assert isinstance(kids[0], Sandbox), kids
        assert _base(kids[0]) != CANONICAL_BASE and _run(kids[0], "stat -c %u /opt/f") == "7"
        kids[0].kill()
    finally:
        old.kill()


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def test_sudo_works_and_a_setuid_binary_reaches_only_the_sandboxs_own_range(
    daemon: DaemonProc, base_template: Any, tmp_path: Path
) -> None:
    """Issue 22.0: with a range of its own a sandbox runs without no_new_privs (as Docker's default does), so
    E2B's `user` with passwordless sudo works; a setuid-root binary it makes is owned by its own root on the host."""
    with Sandbox.create("base", base_url=daemon.url) as sbx, Sandbox.create(base_url=daemon.url) as other:
        base = _base(sbx)
        as_user = {"user": "user"}  # E2B's user of the base template, with passwordless sudo
        assert _run(sbx, "id -un", **as_user) == "user"
        assert _run(sbx, "grep NoNewPrivs /proc/self/status", **as_user).split() == ["NoNewPrivs:", "0"]
        assert _run(sbx, "grep ^Seccomp: /proc/self/status", **as_user).split() == ["Seccomp:", "2"]  # kept
        assert _run(sbx, "sudo -n id -u; sudo -n id -un", **as_user) == "0\nroot"
        assert _run(sbx, "sudo -n touch /root/by-sudo && sudo -n stat -c %U /root/by-sudo", **as_user) == "root"
        bg = sbx.commands.run("sudo -n id -u", background=True, user="user").wait()
        assert bg.exit_code == 0 and bg.stdout.strip() == "0"
        # a setuid-root shell made inside: on the host it belongs to this sandbox's root, nobody else's
        _run(sbx, "sudo -n cp /bin/bash /tmp/rootbash && sudo -n chmod 4755 /tmp/rootbash", **as_user)
        assert _run(sbx, "/tmp/rootbash -p -c 'id -u'", **as_user) == "0"  # inside: root of the sandbox
        found = _upper(daemon, sbx) / "tmp" / "rootbash"
        st = os.lstat(found)
        assert st.st_uid == base and st.st_mode & stat.S_ISUID
        _run(other, "echo secret > /root/secret && chmod 600 /root/secret")
        other_secret = _upper(daemon, other) / "root" / "secret"
        # the attack: the binary leaves the sandbox (host root copies it out, owner and mode kept) and an
        # unprivileged host user runs it: it becomes the sandbox's host uid, which owns nothing of the host's
        # or of another sandbox
        out = tmp_path / "out"
        out.mkdir()
        os.chmod(tmp_path, 0o755)
        os.chmod(out, 0o755)
        copy = out / "rootbash"
        shutil.copy2(found, copy)
        os.chown(copy, st.st_uid, st.st_gid)
        os.chmod(copy, 0o4755)
        script = f"id -u; cat /etc/shadow; cat {other_secret}; touch /etc/escaped"
        run = subprocess.run([*NOBODY, str(copy), "-p", "-c", script], capture_output=True, text=True, check=False)
        assert run.stdout.split("\n")[0] == str(base), (run.stdout, run.stderr)
        assert run.stdout.count("\n") == 1, run.stdout  # nothing read
        assert "/etc/shadow: Permission denied" in run.stderr and "Permission denied" in run.stderr.split("\n")[1]
        assert not Path("/etc/escaped").exists()
