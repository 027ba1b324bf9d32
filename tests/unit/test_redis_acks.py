"""natsconn_redis.acks.AckQueue: acks return at once, one send at a time carries
everything queued meanwhile, failures are the sender's to report."""

from __future__ import annotations

import asyncio
import logging

import pytest
from natsconn_redis.acks import AckQueue


class Recorder:
    def __init__(self, hold: float = 0.0, fail: bool = False) -> None:
        self.lots: list[list[int]] = []
        self.hold = hold
        self.fail = fail
        self.running = 0
        self.most = 0

    async def send(self, lot: list[int]) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.hold)
            self.lots.append(lot)
            if self.fail:
                raise RuntimeError("boom")
        finally:
            self.running -= 1


async def test_what_is_queued_while_a_send_runs_goes_in_the_next_one() -> None:
    rec = Recorder(hold=0.05)
    acks = AckQueue(rec.send, "test-acks", logging.getLogger("test"))
    acks.add([1, 2])
    await asyncio.sleep(0.01)  # the first send is under way
    for i in range(3, 23):
        acks.add([i])
    await acks.sent()
    assert rec.lots == [[1, 2], list(range(3, 23))]
    assert rec.most == 1  # never two round trips at once


async def test_acks_added_without_yielding_share_one_send() -> None:
    rec = Recorder()
    acks = AckQueue(rec.send, "test-acks", logging.getLogger("test"))
    for i in range(20):
        acks.add([i, i + 100])
    await acks.sent()
    assert len(rec.lots) == 1 and sorted(rec.lots[0]) == sorted(
        [*range(20), *range(100, 120)])


async def test_a_failing_send_is_logged_and_the_next_lot_still_goes(
        caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(fail=True)
    acks = AckQueue(rec.send, "test-acks", logging.getLogger("test"))
    acks.add([1])
    await acks.sent()
    assert "test-acks: acknowledging 1 item(s) failed" in caplog.text
    rec.fail = False
    acks.add([2])
    await acks.sent()
    assert rec.lots == [[1], [2]]


async def test_flush_gives_up_after_its_timeout_and_sent_is_done_at_once_when_idle() -> None:
    rec = Recorder(hold=5.0)
    acks = AckQueue(rec.send, "test-acks", logging.getLogger("test"))
    await asyncio.wait_for(acks.sent(), 0.1)  # nothing queued: nothing to wait for
    acks.add([1])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await acks.flush(0.1)
    assert loop.time() - started < 1.0
    assert rec.lots == []  # still holding
    # the send goes on after flush gave up (shielded), it is not cancelled
    assert rec.running == 1
    task = acks._task
    assert task is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
