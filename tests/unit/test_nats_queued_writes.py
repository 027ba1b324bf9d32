"""The core NATS sink's record of messages left queued by a timed-out flush."""

from __future__ import annotations

import gc

from natsconn_nats.queued import QueuedWrites

from connector import Message


def batch(n: int, start: int = 0) -> list[Message]:
    return [Message(b"%d" % i) for i in range(start, start + n)]


def test_a_timed_out_write_is_held_for_its_retry_but_not_the_rejected_ones() -> None:
    queued, messages = QueuedWrites(), batch(3)
    queued.timed_out(messages, write=1, skip={1})
    assert [queued.held(m) for m in messages] == [True, False, True]
    assert not queued.held(Message(b"0"))  # equal data, another message


def test_the_retrys_own_flush_forgets_the_batch() -> None:
    queued, messages = QueuedWrites(), batch(3)
    queued.timed_out(messages, write=1)
    queued.flushed(messages, write=2)
    assert not queued and not any(queued.held(m) for m in messages)


def test_a_later_flush_marks_earlier_writes_delivered_and_a_reconnect_keeps_them() -> None:
    queued, early, late = QueuedWrites(), batch(2), batch(2, 2)
    queued.timed_out(early, write=1)
    queued.timed_out(late, write=3)
    queued.flushed(batch(1, 9), write=2)  # another batch's flush, between the two
    queued.connection_lost()
    assert [queued.held(m) for m in early] == [True, True]  # reached the server
    assert [queued.held(m) for m in late] == [False, False]  # lost with the connection


def test_a_second_timeout_keeps_the_first_write_number() -> None:
    queued, messages = QueuedWrites(), batch(2)
    queued.timed_out(messages, write=1)
    queued.timed_out(messages, write=5)
    queued.flushed(batch(1, 9), write=3)  # after write 1, before write 5
    queued.connection_lost()
    assert all(queued.held(m) for m in messages)


def test_an_entry_goes_with_its_message() -> None:
    queued, messages = QueuedWrites(), batch(100)
    queued.timed_out(messages, write=1)
    assert len(queued) == 100
    del messages
    gc.collect()
    assert len(queued) == 0
