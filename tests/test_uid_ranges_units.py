"""Pure logic of per-sandbox uid ranges (issue 22.1): the allocator and the host-wide block allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchbox.backends.base import IdMap
from branchbox.backends.idranges import CANONICAL_BASE, RANGE_SIZE, IdRanges
from branchbox.backends.microvm.jail import UID_BASE as VM_UID_BASE
from branchbox.daemon.claims import UID_POOL_END, UID_POOL_START, ClaimError, HostNames, allocate_uid_block
from branchbox.errors import LimitExceededError
from branchbox.images.shift import rebase_id

FIRST = 1 << 26


def test_ranges_are_handed_out_lowest_first_and_only_when_free() -> None:
    stored: set[int] = set()
    ids = IdRanges(FIRST, 4, in_use=lambda: set(stored))
    a, b = ids.take("a"), ids.take("b")
    assert (a, b) == (FIRST, FIRST + RANGE_SIZE)
    stored.add(a)  # the record of a is written
    ids.release("a")  # the hold goes, the record keeps it in use
    assert ids.take("c") == FIRST + 2 * RANGE_SIZE
    stored.discard(a)  # a's record is gone: a is free again and serves next (its user namespaces are cached)
    assert ids.take("d") == a
    assert ids.take("e") == FIRST + 3 * RANGE_SIZE
    with pytest.raises(LimitExceededError, match="no free uid range"):
        ids.take("f")
    ids.release("b")
    ids.hold(FIRST + RANGE_SIZE, "unclean:b")  # a teardown that failed keeps it out of use
    with pytest.raises(LimitExceededError):
        ids.take("g")
    ids.transfer(a, "spare")
    assert ids.held("spare") == [a] and ids.free_count() == 0


def test_a_bad_block_is_refused() -> None:
    with pytest.raises(ValueError, match="bad uid block"):
        IdRanges(FIRST + 1, 4, in_use=set)


def test_blocks_are_aligned_disjoint_and_clear_of_reserved_ids(tmp_path: Path) -> None:
    size = 1024 * RANGE_SIZE
    taken: list[tuple[int, int] | None] = []
    for i in range(5):
        first = allocate_uid_block(1024, taken, tmp_path / f"d{i}")
        assert first % size == 0 and first >= UID_POOL_START and first + size <= UID_POOL_END
        assert not first <= VM_UID_BASE < first + size and not first <= CANONICAL_BASE < first + size
        assert all(t is None or first + size <= t[0] or t[1] <= first for t in taken)
        taken.append((first, first + size))
    mine = HostNames("a", uid_first=taken[0][0], uid_ranges=1024)
    other = HostNames("b", uid_first=taken[0][0] + RANGE_SIZE, uid_ranges=1)
    assert any("uid_first" in c for c in mine.clashes(other))
    with pytest.raises(ClaimError, match="too large"):
        allocate_uid_block(1 << 16, [], tmp_path)


def test_rebase_id_moves_only_ids_of_the_range() -> None:
    to = IdMap(FIRST)
    assert rebase_id(CANONICAL_BASE + 1000, CANONICAL_BASE, to) == FIRST + 1000
    assert rebase_id(7, CANONICAL_BASE, to) == 7
