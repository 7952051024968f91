"""The sandbox record keeps its TimeoutPolicy (on_timeout, auto_resume, the creation TTL), and a data dir made
before the policy existed opens with the default one (destroy on timeout)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from branchbox.core.store import Store
from branchbox.models import Resources, SandboxInfo, SandboxState, TimeoutPolicy

INFO = SandboxInfo(
    id="sbx-1",
    template="default",
    template_digest="d" * 64,
    backend="container",
    state=SandboxState.RUNNING,
    created_at=1.0,
    expires_at=2.0,
    resources=Resources(),
)


def test_policy_round_trips(tmp_path: Path) -> None:
    db = Store(tmp_path / "state.db")
    policy = TimeoutPolicy(on_timeout="pause", auto_resume=True, timeout=300.0)
    db.insert(replace(INFO, lifecycle=policy))
    rec = db.get("sbx-1")
    assert rec is not None and rec.info.lifecycle == policy
    db.update("sbx-1", lifecycle=TimeoutPolicy(timeout=5.0), expires_at=None)
    rec = db.get("sbx-1")
    assert rec is not None and rec.info.lifecycle == TimeoutPolicy(timeout=5.0) and rec.info.expires_at is None
    db.close()


def test_records_of_older_daemons_destroy_on_timeout(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE sandboxes DROP COLUMN lifecycle")  # the table as the daemon before this change made it
    con.execute(
        "INSERT INTO sandboxes (id, template, template_digest, backend, state, created_at, expires_at, resources,"
        " metadata, env, hostname, source, timings) VALUES ('old', 'default', 'x', 'container', 'paused', 1, 2,"
        " '{\"cpu\": 1, \"memory_mb\": 512, \"pids\": 256}', '{}', '{}', 'h', 'cold', '{}')"
    )
    con.commit()
    con.close()
    db = Store(path)
    rec = db.get("old")
    assert rec is not None and rec.info.lifecycle == TimeoutPolicy() and rec.info.state is SandboxState.PAUSED
    db.insert(replace(INFO, id="new", lifecycle=TimeoutPolicy(on_timeout="pause")))
    assert [r.info.lifecycle.on_timeout for r in db.all()] == ["destroy", "pause"]
    db.close()
