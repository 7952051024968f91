"""Warm pools on the real container backend: fill, claim, refill, bursts, budget, death, restart, reset."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from branchbox import errors
from branchbox.backends.container import ContainerBackend
from branchbox.core.manager import Manager
from branchbox.core.pool import PoolConfig
from branchbox.models import TemplateInfo
from tests.conftest import make_settings
from tests.leaks import HostSnapshot

pytestmark = [pytest.mark.root, pytest.mark.template]


def _pool(**kw: object) -> PoolConfig:
    base: dict[str, object] = {"template": "default", "min_size": 2, "target_free": 2, "max_size": 4,
                               "memory_mb": 256}  # fmt: skip
    base.update(kw)
    return PoolConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
async def pooled(default_template: TemplateInfo, data_dir: Path) -> AsyncIterator[Manager]:
    async with Manager.open(make_settings(data_dir, pools=(_pool(),))) as m:
        await asyncio.wait_for(m.wait_pool_ready("default"), 60)
        yield m


def _stats(m: Manager) -> dict[str, object]:
    (s,) = m.pool_statistics()
    return {"ready": s.ready, "booting": s.booting, "hits": s.hits, "misses": s.misses, "replaced": s.replaced,
            "recycled": s.recycled, "claimed": s.claimed}  # fmt: skip


async def test_pool_fills_and_claims_are_warm(pooled: Manager) -> None:
    assert _stats(pooled)["ready"] == 2
    assert await pooled.list() == []  # members are nobody's sandboxes yet
    sbx = await pooled.create(memory_mb=256, env={"A": "1"}, metadata={"task": "t"}, hostname="mybox")
    assert sbx.source == "warm"
    assert "claim" in sbx.timings
    r = await pooled.exec(sbx.id, "echo $A; hostname; cat /etc/hostname; getent hosts mybox localhost")
    assert r.stdout.decode().split("\n")[:3] == ["1", "mybox", "mybox"]  # the files follow the claim's rename
    assert "127.0.1.1       mybox" in r.stdout.decode() and "localhost" in r.stdout.decode(), r.stdout
    assert [s.id for s in await pooled.list(metadata={"task": "t"})] == [sbx.id]
    await asyncio.wait_for(pooled.wait_pool_ready("default"), 60)  # refilled in the background
    st = _stats(pooled)
    assert (st["ready"], st["hits"], st["claimed"]) == (2, 1, 1)


async def test_other_resources_are_cold(pooled: Manager) -> None:
    sbx = await pooled.create(memory_mb=300)
    assert sbx.source == "cold"


async def test_burst_larger_than_pool_falls_back_to_cold_and_recovers(pooled: Manager) -> None:
    sbxs = await asyncio.gather(*(pooled.create(memory_mb=256) for _ in range(6)))
    assert sorted(s.source for s in sbxs) == ["cold"] * 4 + ["warm"] * 2
    results = await asyncio.gather(*(pooled.exec(s.id, "true") for s in sbxs))
    assert all(r.exit_code == 0 for r in results)
    await asyncio.wait_for(pooled.wait_pool_ready("default"), 60)
    assert _stats(pooled)["misses"] == 4


async def test_memory_budget_is_respected(default_template: TemplateInfo, data_dir: Path) -> None:
    cfg = _pool(min_size=0, target_free=4, max_size=8, max_memory_mb=600)  # 600 // 256 = 2 members
    async with Manager.open(make_settings(data_dir, pools=(cfg,))) as m:
        await asyncio.wait_for(m.wait_pool_ready("default"), 60)
        (s,) = m.pool_statistics()
        assert (s.ready, s.booting) == (2, 0)
        assert len(m._live) == 2


async def test_killed_member_is_detected_and_replaced(pooled: Manager) -> None:
    victim = pooled._pools["default"].ready[0]
    os.kill(victim.handle.pid, signal.SIGKILL)
    await asyncio.wait_for(_until(lambda: _stats(pooled)["replaced"] == 1), 30)
    await asyncio.wait_for(pooled.wait_pool_ready("default"), 60)
    assert victim.info.id not in pooled._live
    sbx = await pooled.create(memory_mb=256)
    assert (await pooled.exec(sbx.id, "true")).exit_code == 0


async def test_restart_keeps_pool_members_without_leaks(default_template: TemplateInfo, data_dir: Path) -> None:
    settings = make_settings(data_dir, pools=(_pool(),), keep_sandboxes_on_shutdown=True)
    async with Manager.open(settings) as m1:
        await asyncio.wait_for(m1.wait_pool_ready("default"), 60)
        ids = {live.info.id for live in m1._pools["default"].ready}
    async with Manager.open(settings) as m2:
        assert {live.info.id for live in m2._pools["default"].ready} == ids
        sbx = await m2.create(memory_mb=256)
        assert sbx.id in ids and sbx.source == "warm"
        assert (await m2.exec(sbx.id, "echo ok")).stdout == b"ok\n"
    # a restart with the pool removed from the config destroys the members it finds
    async with Manager.open(make_settings(data_dir, keep_sandboxes_on_shutdown=False)) as m3:
        assert m3.pool_statistics() == []
        assert [s.id for s in await m3.list()] == [sbx.id]
        await m3.destroy(sbx.id)
        assert list((data_dir / "sandboxes").iterdir()) == []
    HostSnapshot.take(settings.cgroup_parent).assert_no_cgroups()


async def test_golden_reset_leaves_nothing_of_the_previous_user(default_template: TemplateInfo, data_dir: Path) -> None:
    cfg = _pool(min_size=1, target_free=1, max_size=1, reuse=True)
    async with Manager.open(make_settings(data_dir, pools=(cfg,))) as m:
        await asyncio.wait_for(m.wait_pool_ready("default"), 60)
        first = await m.create(memory_mb=256, env={"SECRET_TOKEN": "hunter2"})
        assert first.source == "warm"
        await m.exec(first.id, "echo data > /work/secret; echo tmp > /tmp/t; echo 'history' > /root/.bash_history")
        await m.spawn(first.id, "sleep 1000", tag="left-behind")
        await m.destroy(first.id)
        await asyncio.wait_for(m.wait_pool_ready("default"), 60)
        second = await m.create(memory_mb=256)
        assert second.source == "warm"
        r = await m.exec(second.id, "ls -A /work /tmp; cat /root/.bash_history; env; ps -eo args")
        out = r.stdout.decode()
        for leftover in ("secret", "hunter2", "SECRET_TOKEN", "sleep 1000", "history"):
            assert leftover not in out, leftover
        assert _stats(m)["recycled"] == 1


async def test_live_reconfiguration(pooled: Manager) -> None:
    stats = await pooled.configure_pool(_pool(min_size=3, target_free=3))
    assert stats.config.target == 3
    await asyncio.wait_for(pooled.wait_pool_ready("default", 3), 60)
    await pooled.configure_pool(_pool(min_size=1, target_free=1))
    await asyncio.wait_for(_until(lambda: _stats(pooled)["ready"] == 1 and len(pooled._live) == 1), 30)
    await pooled.remove_pool("default")
    assert pooled.pool_statistics() == []
    await asyncio.wait_for(_until(lambda: not pooled._live), 30)
    with pytest.raises(errors.NotFoundError):
        await pooled.remove_pool("default")


@pytest.mark.parametrize(
    "kw",
    [
        {"min_size": 5, "max_size": 2},
        {"target_free": 9, "max_size": 2},
        {"max_parallel_boots": 0},
        {"min_size": -1},
        {"max_size": 5000},
    ],
)
def test_bad_pool_config_is_rejected(kw: dict[str, int]) -> None:
    with pytest.raises(errors.BadRequestError):
        _pool(**kw)


async def test_pool_of_unknown_template_is_rejected(pooled: Manager) -> None:
    with pytest.raises(errors.TemplateNotFoundError):
        await pooled.configure_pool(_pool(template="nope"))


async def _until(pred: object) -> None:
    assert callable(pred)
    while not pred():
        await asyncio.sleep(0.01)


def _nice(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])  # field 19 of proc(5)


async def test_members_boot_in_the_background_and_claims_run_at_normal_priority(pooled: Manager) -> None:
    member = pooled._pools["default"].ready[0]
    backend = member.backend
    assert isinstance(backend, ContainerBackend)
    cg = backend._cg()
    assert cg.cpu_dir(member.info.id) is not None, "this host mounts the cpu controller"
    assert _nice(member.handle.pid) > 0  # refills yield the CPU to users' sandboxes: in their cgroup
    assert cg.is_idle(member.info.id)  # ... and next to the other sandboxes' cgroups
    sbx = await pooled.create(memory_mb=256)
    assert sbx.id == member.info.id
    assert _nice(member.handle.pid) == 0
    assert not cg.is_idle(sbx.id)
    r = await pooled.exec(sbx.id, ["sh", "-c", "cut -d' ' -f19 /proc/self/stat"])
    assert r.stdout == b"0\n"
