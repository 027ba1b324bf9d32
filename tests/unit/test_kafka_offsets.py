"""The Kafka source's offset bookkeeping (natsconn_kafka.offsets), no broker needed:
out-of-order acks never commit past a gap, nacks rewind, revokes retire."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from natsconn_kafka.offsets import PartitionTracker


def test_out_of_order_acks_stop_at_the_gap() -> None:
    t = PartitionTracker()
    a, b, c = t.read(0, 9, 10), t.read(10, 19, 10), t.read(20, 29, 10)
    t.ack(c)
    assert t.to_commit() is None and t.pending == 30
    t.ack(a)
    assert t.to_commit() == 10  # b is still out: not past it
    t.ack(b)
    assert t.to_commit() == 30 and t.pending == 0
    t.committed = 30
    assert t.to_commit() is None


def test_offsets_with_holes_commit_after_the_last_record() -> None:
    t = PartitionTracker()
    a = t.read(5, 40, 3)  # compacted or transactional: offsets skip
    t.ack(a)
    assert t.to_commit() == 41


def test_nack_rewinds_and_drops_later_chunks() -> None:
    t = PartitionTracker()
    a, b, c = t.read(0, 9, 10), t.read(10, 19, 10), t.read(20, 29, 10)
    assert t.nack(b) == 10
    assert t.next_read == 10 and t.pending == 10
    t.ack(c)  # dropped with b: its ack must not move anything
    t.ack(a)
    assert t.to_commit() == 10
    assert t.nack(c) is None  # already dropped
    b2 = t.read(10, 29, 20)  # read again after the seek
    t.ack(b2)
    assert t.to_commit() == 30


def test_retired_tracker_ignores_late_acks() -> None:
    t = PartitionTracker()
    a, b = t.read(0, 9, 10), t.read(10, 19, 10)
    t.ack(a)
    t.retire()
    t.ack(b)
    assert t.to_commit() == 10  # what was confirmed before the revoke, nothing after
    assert t.nack(b) is None and t.pending == 0


@given(st.lists(st.integers(1, 5), min_size=1, max_size=30), st.randoms())
def test_commit_point_is_the_acked_prefix(sizes: list[int], rnd: object) -> None:
    t = PartitionTracker()
    chunks = []
    offset = 0
    for n in sizes:
        chunks.append(t.read(offset, offset + n - 1, n))
        offset += n
    order = list(range(len(chunks)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    acked: set[int] = set()
    for i in order:
        t.ack(chunks[i])
        acked.add(i)
        prefix = 0
        while prefix in acked:
            prefix += 1
        want = None if prefix == 0 else chunks[prefix - 1].next
        assert t.to_commit() == want
        assert t.pending == sum(c.count for c in chunks[prefix:])
