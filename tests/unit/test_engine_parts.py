"""The engine's small parts on their own: batcher, sink batch, window, tracker, backoff."""

from __future__ import annotations

import asyncio

import pytest

from connector.engine.backoff import Backoff
from connector.engine.batcher import Batcher, SinkBatch
from connector.engine.deadletter import carriable, header_safe
from connector.engine.tracker import Tracker
from connector.engine.window import Window

from ._fakes import RecordingAck, msg


def tracker(n: int = 0, label: str = "t") -> Tracker:
    t = Tracker(RecordingAck(label), n, 0)
    t.remaining = n
    return t


def sizes(batches: list[SinkBatch]) -> list[int]:
    return [len(b) for b in batches]


# ------------------------------------------------------------------ batcher


def test_batcher_cuts_by_count_across_chunks() -> None:
    b = Batcher(max_messages=4, max_bytes=1 << 20, max_wait=1.0)
    assert b.add([msg(i) for i in range(3)], tracker(3)) == []
    full = b.add([msg(i) for i in range(3, 10)], tracker(7))
    assert sizes(full) == [4, 4]
    assert [m.id for m in full[0].messages] == ["id-0", "id-1", "id-2", "id-3"]
    rest = b.flush()
    assert rest is not None and [m.id for m in rest.messages] == ["id-8", "id-9"]
    assert b.flush() is None


def test_batcher_cuts_by_bytes_and_sends_an_oversized_message_alone() -> None:
    b = Batcher(max_messages=100, max_bytes=250, max_wait=1.0)
    chunk = [msg(0, 100), msg(1, 100), msg(2, 100), msg(3, 400), msg(4, 100)]
    full = b.add(chunk, tracker(5))
    assert [[m.id for m in x.messages] for x in full] == [["id-0", "id-1"], ["id-2"], ["id-3"]]
    assert [x.nbytes for x in full] == [200, 100, 400]
    rest = b.flush()
    assert rest is not None and rest.nbytes == 100


def test_batcher_exact_byte_fit_is_full() -> None:
    b = Batcher(max_messages=100, max_bytes=200, max_wait=1.0)
    assert sizes(b.add([msg(0, 100), msg(1, 100)], tracker(2))) == [2]
    assert b.flush() is None


def test_sink_batch_spans_map_indices_back_to_source_batches() -> None:
    b = Batcher(max_messages=5, max_bytes=1 << 20, max_wait=1.0)
    t1, t2 = tracker(3, "one"), tracker(4, "two")
    b.add([msg(i) for i in range(3)], t1)
    [full] = b.add([msg(i) for i in range(3, 7)], t2)
    assert [full.owner(i) for i in range(5)] == [t1, t1, t1, t2, t2]
    with pytest.raises(IndexError):
        full.owner(5)


def test_batcher_time_left_counts_from_the_first_message() -> None:
    b = Batcher(max_messages=10, max_bytes=1 << 20, max_wait=0.5)
    assert b.time_left() is None
    b.add([msg(0)], tracker(1))
    left = b.time_left()
    assert left is not None and 0 < left <= 0.5
    b.flush()
    assert b.time_left() is None


def test_sink_batch_claims_each_index_once() -> None:
    batch = SinkBatch()
    batch.add([msg(i) for i in range(4)], tracker(4), 0)
    assert batch.claim([0, 2]) == [0, 2]
    assert batch.claim([0, 1, 2]) == [1]
    assert not batch.claim_all()
    assert batch.claim(range(4)) == [3]
    assert batch.unresolved == 0
    fresh = SinkBatch()
    fresh.add([msg(0)], tracker(1), 0)
    assert fresh.claim_all()
    assert fresh.claim([0]) == []


# ------------------------------------------------------------------- window


async def test_window_room_by_messages_and_bytes() -> None:
    w = Window(max_messages=10, max_bytes=100)
    assert w.room() == 10
    w.take(4, 30)
    assert w.room() == 6
    w.take(1, 70)
    assert w.room() == 0  # bytes full even though messages are not
    waiter = asyncio.create_task(w.wait_room())
    await asyncio.sleep(0)
    assert not waiter.done()
    w.release(1, 70)
    await asyncio.wait_for(waiter, 1)
    assert (w.messages, w.bytes) == (4, 30)


# ------------------------------------------------------------------ tracker


async def test_tracker_settles_once_with_the_right_verdict() -> None:
    ok = tracker(2, "ok")
    assert not ok.done(1)
    assert ok.done(1)
    assert await ok.settle() == "ack"

    failed = tracker(2, "failed")
    failed.terminate("poison")
    failed.fail(1.5)
    assert await failed.settle() == "nack"  # a failure beats a termination: redeliver
    assert failed.ack.calls == [("nack", 1.5)]  # type: ignore[attr-defined]

    poisoned = tracker(1, "poisoned")
    poisoned.terminate("first reason")
    poisoned.terminate("second reason")
    assert await poisoned.settle() == "term"
    assert poisoned.ack.calls == [("term", "first reason")]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ backoff


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(initial=0.1, maximum=1.0, multiplier=2.0)
    waits = [b.next() for _ in range(8)]
    ceilings = [min(1.0, 0.1 * 2**n) for n in range(8)]
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 <= wait <= ceiling
    b.reset()
    assert 0.05 <= b.next() <= 0.1


def test_backoff_honours_retry_after() -> None:
    b = Backoff(initial=0.01, maximum=0.1)
    assert b.next(at_least=5.0) == 5.0
    assert b.next(at_least=None) <= 0.1


def test_jitter_spreads_waits() -> None:
    waits = {round(Backoff(1.0, 10.0).next(), 6) for _ in range(20)}
    assert len(waits) > 1


def test_buffer_age_bounds_the_oldest_unread_message() -> None:
    from natsconn_nats.buffer_age import BufferAge

    age = BufferAge()
    assert age.oldest_wait(0.0) == 0.0
    age.pushed = 5  # five arrive before the first mark
    age.mark(1.0)
    assert age.oldest_wait(1.0) == 0.0
    age.pushed = 8
    age.mark(2.0)
    assert age.oldest_wait(4.0) == 3.0  # the first five came before t=1
    age.taken = 5  # those five read: the oldest now came before t=2
    assert age.oldest_wait(4.0) == 2.0
    age.refreshed(4.0)
    assert age.oldest_wait(5.5) == 1.5
    age.taken = 8  # all read
    assert age.oldest_wait(9.0) == 0.0


def test_letter_text_that_is_not_utf8_is_escaped_so_any_target_carries_it() -> None:
    raw = b"\xff\xfe".decode("utf-8", "surrogateescape")  # as Kafka and Redis read it
    assert carriable("plain é") == "plain é"
    assert carriable(raw) == "\\xff\\xfe"
    assert carriable("a\ud800b") == "a\\ud800b"  # a surrogate no decoder made
    for text in (carriable(raw), carriable("a\ud800b"), header_safe(f"bad {raw}\nline")):
        text.encode("utf-8")  # strict: what a NATS header needs
    assert header_safe(f"bad {raw}\nline") == "bad \\xff\\xfe line"
