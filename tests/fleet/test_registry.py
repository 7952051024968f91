"""The fleet registry's allocator as pure logic: filter, score, select; reservations; pushes; drain; loss."""

from __future__ import annotations

import random

import pytest

from branchbox.errors import BadRequestError, NoCapacityError, NodeNotFoundError
from branchbox.fleet.registry import Capacity, Registry, Request

KEY = ("default", "container")


def cap(mem: int = 4096, cpu: int = 4000, *, warm: int = 0, running: int = 0, keys: tuple = (KEY,)) -> Capacity:
    return Capacity(mem, cpu, running, frozenset(keys), {KEY: warm} if warm else {})


def req(mem: int = 512, cpu: int = 1000, **kw: object) -> Request:
    return Request("default", "container", mem, cpu, **kw)  # type: ignore[arg-type]


def fleet(*caps: Capacity, labels: list[dict[str, str]] | None = None, policy: str = "spread") -> Registry:
    r = Registry(stale_after=3.0, policy=policy)  # type: ignore[arg-type]
    for i, c in enumerate(caps):
        r.register(f"n{i}", f"http://n{i}", c, labels=(labels[i] if labels else None), now=0.0)
    return r


def test_spread_takes_the_most_free_memory_and_ties_go_to_the_first_registered() -> None:
    r = fleet(cap(2048), cap(4096), cap(4096))
    assert r.allocate(req(), now=0).node_id == "n1"  # n1 and n2 tie: n1 came first
    assert r.allocate(req(), now=0).node_id == "n2"  # n1 now has 512 less
    assert r.allocate(req(), now=0).node_id == "n1"
    assert r.get("n1").memory_mb == 3072 and r.get("n1").running == 2


def test_pack_takes_the_fullest_node_that_fits() -> None:
    r = fleet(cap(4096), cap(1024), cap(600), policy="pack")
    picks = [r.allocate(req(), now=0).node_id for _ in range(4)]
    assert picks == ["n2", "n1", "n1", "n0"]  # n2 fits one, n1 two, then the big one


def test_a_free_warm_member_wins_over_the_policy() -> None:
    r = fleet(cap(8192), cap(1024, warm=1))
    first = r.allocate(req(), now=0)
    assert (first.node_id, first.warm) == ("n1", True)
    second = r.allocate(req(), now=0)  # the warm member is taken: back to spread
    assert (second.node_id, second.warm) == ("n0", False)
    assert r.get("n1").warm == {}


def test_exhaustion_says_why_and_reserves_nothing() -> None:
    r = fleet(cap(1024, cpu=2000))
    r.allocate(req(1024, 1000), now=0)
    with pytest.raises(NoCapacityError, match="full, draining or unreachable") as info:
        r.allocate(req(1, 1), now=0)
    assert info.value.code == "no_capacity"
    assert r.get("n0").memory_mb == 0 and r.get("n0").cpu_millis == 1000
    with pytest.raises(NoCapacityError, match="no node of the fleet holds template 'other'"):
        r.allocate(Request("other", "container", 1, 1), now=0)


def test_cpu_must_fit_too() -> None:
    r = fleet(cap(8192, cpu=500), cap(1024, cpu=4000))
    assert r.allocate(req(512, 1000), now=0).node_id == "n1"


def test_labels_filter() -> None:
    r = fleet(cap(8192), cap(1024), labels=[{"region": "eu"}, {"region": "us", "kvm": "1"}])
    assert r.allocate(req(labels=(("region", "us"),)), now=0).node_id == "n1"
    assert r.allocate(req(labels=(("kvm", "1"), ("region", "us"))), now=0).node_id == "n1"
    with pytest.raises(NoCapacityError, match="with labels"):
        r.allocate(req(labels=(("region", "ap"),)), now=0)


def test_release_gives_back_and_commit_keeps_for_its_grace() -> None:
    r = fleet(cap(1024))
    a = r.allocate(req(1024), now=0)
    r.release(a)
    assert r.get("n0").memory_mb == 1024
    b = r.allocate(req(1024), now=0)
    # a push read before the node created the sandbox still shows the memory free: the reservation holds it
    r.update("n0", cap(1024), seq=1, now=0)
    assert r.get("n0").memory_mb == 0
    r.commit(b, now=1.0)
    r.update("n0", cap(1024), seq=2, now=2.0)  # still a push from before the create, within the grace (2 s)
    assert r.get("n0").memory_mb == 0
    r.update("n0", cap(0, running=1), seq=3, now=2.5)  # it counts the sandbox now (twice for a moment: 0)
    assert r.get("n0").memory_mb == 0
    r.update("n0", cap(1024), seq=4, now=3.5)  # after the grace the push alone counts: destroyed on the node
    assert r.allocate(req(1024), now=3.5).node_id == "n0"


def test_a_destroy_gives_a_held_commit_back_at_once() -> None:
    """A burst of short-lived sandboxes: created and destroyed through the controller within the commit grace,
    each must give its room back at its destroy, not 2 s later (a one-sandbox node took only one before)."""
    for policy in ("spread", "pack"):
        r = fleet(cap(1024, cpu=1000), policy=policy)
        for i in range(5):
            a = r.allocate(req(1024, 1000), now=0)
            r.commit(a, now=0.1 * i, ident=f"s{i}")
            r.update("n0", cap(0, cpu=0, running=1), seq=i + 1, now=0.1 * i)  # a push that counts it too
            assert r.get("n0").memory_mb == 0
            assert r.forget("n0", f"s{i}")
            assert not r.forget("n0", f"s{i}")  # once
            assert r.get("n0").memory_mb == 1024  # its room is back before the node's next push
        r.update("n0", cap(0, cpu=0, running=1), seq=99, now=0.6)  # a direct create on the node: pushes count
        with pytest.raises(NoCapacityError):
            r.allocate(req(1024, 1000), now=0.6)
    assert not r.forget("n0", "unknown") and not r.forget("nope", "s1") and not r.forget("n0", "")


def test_stale_pushes_are_ignored() -> None:
    r = fleet(cap(1024))
    assert r.update("n0", cap(4096), seq=5, now=1)
    assert not r.update("n0", cap(0), seq=4, now=2)  # older than the last one seen
    assert not r.update("n0", cap(0), seq=5, now=2)
    assert r.get("n0").memory_mb == 4096 and r.get("n0").seq == 5


def test_nodes_not_heard_from_are_skipped_then_lost_and_come_back() -> None:
    r = fleet(cap(8192), cap(1024))
    r.heartbeat("n1", now=10.0)
    assert r.allocate(req(), now=10.0).node_id == "n1"  # n0's last word is 10 s old: skipped
    assert r.sweep(now=10.0) == ["n0"]
    assert r.get("n0").lost and r.sweep(now=10.0) == []
    r.heartbeat("n0", now=11.0)  # it answers again
    assert not r.get("n0").lost
    assert r.allocate(req(), now=11.0).node_id == "n0"


def test_drain_stops_new_placements_and_undrain_restores_them() -> None:
    r = fleet(cap(8192), cap(1024))
    r.drain("n0")
    assert {r.allocate(req(), now=0).node_id for _ in range(2)} == {"n1"}
    assert r.get("n0").draining
    r.drain("n0", False)
    assert r.allocate(req(), now=0).node_id == "n0"


def test_a_rejoin_resets_reservations_and_lost_state() -> None:
    r = fleet(cap(1024))
    r.allocate(req(1024), now=0)
    r.mark_lost("n0")
    with pytest.raises(NoCapacityError):
        r.allocate(req(1), now=0)
    r.register("n0", "http://n0-new", cap(1024), now=1)
    a = r.allocate(req(1024), now=1)
    assert (a.node_id, a.url) == ("n0", "http://n0-new")


def test_bad_input() -> None:
    with pytest.raises(BadRequestError, match="use one of spread, pack"):
        Registry(policy="first")  # type: ignore[arg-type]
    r = fleet(cap(1024))
    with pytest.raises(NodeNotFoundError):
        r.drain("nope")
    with pytest.raises(BadRequestError, match="negative"):
        r.update("n0", cap(-1), seq=9, now=0)
    r.remove("n0")
    assert len(r) == 0 and "n0" not in r


@pytest.mark.parametrize("seed", range(6))
def test_the_indexes_agree_with_a_scan_over_random_operations(seed: int) -> None:
    """The lazy indexes pick what a plain scan of every node would pick (model check)."""
    rng = random.Random(seed)
    keys = [(f"t{i}", "container") for i in range(3)]
    policy = ("spread", "pack")[seed % 2]
    r = Registry(stale_after=1e9, policy=policy)  # type: ignore[arg-type]
    for i in range(12):
        held = frozenset(rng.sample(keys, rng.randint(1, 3)))
        warm = {k: rng.randint(0, 2) for k in held}
        r.register(f"n{i}", "u", Capacity(rng.randint(0, 8) * 256, 4000, 0, held, warm), now=0)
    allocs = []
    for step in range(600):
        op = rng.random()
        if op < 0.1 and allocs:
            r.release(allocs.pop(rng.randrange(len(allocs))))
            continue
        if op < 0.15:
            nid = f"n{rng.randrange(12)}"
            view = r.get(nid)
            r.update(nid, Capacity(rng.randint(0, 8) * 256, 4000, 0, view.templates, {}), seq=step + 1, now=0)
            continue
        key = rng.choice(keys)
        rq = Request(key[0], key[1], rng.choice([256, 512]), 1)
        views = [v for v in r.list() if key in v.templates and v.memory_mb >= rq.memory_mb]
        order = {v.node_id: i for i, v in enumerate(r.list())}
        warm = [v for v in views if v.warm.get(key, 0) > 0]
        pool = warm or views
        if not pool:
            with pytest.raises(NoCapacityError):
                r.allocate(rq, now=0)
            continue
        got = r.allocate(rq, now=0)
        if policy == "spread":  # the most free memory; ties: the first registered
            best = min(pool, key=lambda v: (-v.memory_mb, order[v.node_id]))
            assert (got.node_id, got.warm) == (best.node_id, bool(warm)), step
        else:  # the least free memory that fits (ties in no fixed order)
            least = min(v.memory_mb for v in pool)
            assert got.node_id in {v.node_id for v in pool if v.memory_mb == least}, step
            assert got.warm == bool(warm), step
        allocs.append(got)
