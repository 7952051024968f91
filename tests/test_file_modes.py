"""Other host users reach nothing of a daemon's data: the data dir, sandboxes' upper dirs and snapshot layers are
0700, the state database (every sandbox's env) and its WAL files 0600. Tried as an unprivileged host user with a
setuid binary a sandbox left in its upper dir."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from branchbox.core.manager import Manager
from branchbox.models import TemplateInfo
from tests.conftest import make_settings

pytestmark = pytest.mark.root
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_data_dir_state_and_uppers_are_private(default_template: TemplateInfo, data_dir: Path) -> None:
    assert _mode(data_dir) == 0o711  # as the fixture made it: the Manager tightens it
    async with Manager.open(make_settings(data_dir)) as m:
        info = await m.create()
        # a setuid-root (inside) shell in the sandbox's upper dir: host uid 100000, the owner of every sandbox
        r = await m.exec(info.id, ["sh", "-c", "cp /bin/sh /opt/suid && chmod 4755 /opt/suid && echo ok > /opt/f"])
        assert r.exit_code == 0, r.stderr_text
        await m.snapshot(info.id)
        uppers = [p for p in data_dir.rglob("opt/suid") if p.is_file()]
        assert uppers, "the upper dir holds the file"
        for d in (data_dir, data_dir / "sandboxes", data_dir / "layers"):
            assert _mode(d) == 0o700, d
        db = data_dir / "state.db"
        for f in (db, db.with_name("state.db-wal"), db.with_name("state.db-shm")):
            assert f.exists() and _mode(f) == 0o600, f
        for suid in uppers:  # the sandbox's and the snapshot layer's copy
            assert _mode(suid) & stat.S_ISUID
            # an unprivileged user's shell runs it by path (setpriv would exec it before its path is checked)
            as_user = [*NOBODY, "sh", "-c", f"{suid} -c 'id -u'"]
            run = subprocess.run(as_user, capture_output=True, text=True, check=False)
            assert run.returncode != 0 and "Permission denied" in run.stderr, (run.stdout, run.stderr)
            cat = subprocess.run([*NOBODY, "cat", str(suid.parent / "f")], capture_output=True, check=False)
            assert cat.returncode != 0
        state = subprocess.run([*NOBODY, "cat", str(db)], capture_output=True, check=False)
        assert state.returncode != 0
        # the sandbox works as before: its layers reach it as open descriptors, not by path
        assert (await m.exec(info.id, "cat /opt/f")).stdout_text == "ok\n"
        fork = (await m.fork(info.id, count=1))[0]
        assert not isinstance(fork, Exception), fork
        assert (await m.exec(fork.id, "cat /opt/f")).stdout_text == "ok\n"
