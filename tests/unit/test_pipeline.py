"""The engine's pipeline, in-process with fake plugins: batching, concurrency,
backpressure, acks, retries, dead letters, drain and stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import cast

import pytest

from connector import Message, PartialWriteError, RejectedError, RetryableError
from connector.engine import Pipeline, PipelineState
from connector.ops.metrics import REGISTRY as METRICS

from ._fakes import FakeSink, FakeSource, make_pipeline, msg, takes, until


def parts(pipe: Pipeline) -> tuple[FakeSource, FakeSink]:
    return cast(FakeSource, pipe.source), cast(FakeSink, pipe.sink)


def dlq(pipe: Pipeline) -> FakeSink:
    assert pipe.dead_letter is not None
    return cast(FakeSink, pipe.dead_letter)


def sample(name: str, pipe: Pipeline, **labels: str) -> float:
    return METRICS.get_sample_value(name, {"pipeline": pipe.name, **labels}) or 0.0


async def finish(pipe: Pipeline, task: asyncio.Task[None] | None = None,
                 timeout: float = 5.0) -> None:
    """End the fake source's input and wait for the pipeline to drain and finish."""
    source, _ = parts(pipe)
    source.end()
    await asyncio.wait_for(task if task is not None else pipe.run(), timeout)
    assert pipe.state is PipelineState.FINISHED


# ------------------------------------------------------------- batching


async def test_rebatches_to_max_messages_and_flushes_the_rest_at_end() -> None:
    pipe = make_pipeline(batch={"max_messages": 10, "max_wait": "1s"})
    source, sink = parts(pipe)
    for b in range(5):
        source.feed([msg(b * 5 + i) for i in range(5)])
    await finish(pipe)
    assert [len(a) for a in sink.attempts] == [10, 10, 5]
    assert [m.id for m in sink.written] == [f"id-{i}" for i in range(25)]
    assert all(a.settlements == [("ack", None)] for a in source.acks)
    assert source.closed and sink.closed


async def test_partial_batch_is_written_after_max_wait_while_source_is_idle() -> None:
    pipe = make_pipeline(batch={"max_messages": 100, "max_wait": "30ms"})
    source, sink = parts(pipe)
    task = asyncio.create_task(pipe.run())
    fed = time.monotonic()
    ack = source.feed([msg(i) for i in range(3)])
    await until(lambda: len(sink.attempts) == 1, timeout=2)
    waited = time.monotonic() - fed
    assert waited >= 0.03, "a partial batch must linger for max_wait before it is written"
    assert not task.done(), "the flush came from the linger timer, not from the end of input"
    await until(lambda: ack.settlements == [("ack", None)])
    await finish(pipe, task)
    assert [len(a) for a in sink.attempts] == [3]


async def test_max_bytes_splits_batches_and_an_oversized_message_goes_alone() -> None:
    pipe = make_pipeline(batch={"max_messages": 100, "max_bytes": 250, "max_wait": "1s"})
    source, sink = parts(pipe)
    source.feed([msg(i, size=100) for i in range(5)] + [msg(5, size=300), msg(6, size=100)])
    await finish(pipe)
    assert [[m.id for m in a] for a in sink.attempts] == [
        ["id-0", "id-1"], ["id-2", "id-3"], ["id-4"], ["id-5"], ["id-6"],
    ]
    assert all(sum(len(m.data) for m in a) <= 250 for a in sink.attempts if len(a) > 1)


# ------------------------------------------------------ concurrency, backpressure


async def test_max_in_flight_bounds_concurrent_writes() -> None:
    pipe = make_pipeline(batch={"max_messages": 5, "max_wait": "1ms"}, max_in_flight=3)
    source, sink = parts(pipe)

    sink.behaviour = takes(0.005)
    for b in range(20):
        source.feed([msg(b * 5 + i) for i in range(5)])
    await finish(pipe)
    assert len(sink.written) == 100
    assert sink.max_active == 3


async def test_blocked_sink_stops_reads_and_bounds_in_flight() -> None:
    pipe = make_pipeline(source={"type": "fake", "per_read": 10},
                         batch={"max_messages": 10, "max_wait": "1ms"}, max_in_flight=2)
    source, sink = parts(pipe)
    gate = asyncio.Event()

    async def blocked(messages: Sequence[Message], attempt: int) -> None:
        await gate.wait()

    sink.behaviour = blocked
    task = asyncio.create_task(pipe.run())
    await until(lambda: sink.active == 2)
    await asyncio.sleep(0.05)  # give the reader every chance to read more than it may
    window = 10 * (2 + 1)
    assert source.read_messages <= window
    reads = source.reads
    assert pipe.in_flight <= window
    assert sample("natsconn_in_flight_messages", pipe) <= window
    await asyncio.sleep(0.02)
    assert source.reads == reads, "the source was read while the window was full"
    assert not any(a.settlements for a in source.acks), "nothing may be acked before a write"
    gate.set()
    await until(lambda: len(sink.written) >= 100)
    pipe.stop(time.monotonic() + 2)
    await asyncio.wait_for(task, 3)
    assert pipe.state is PipelineState.STOPPED
    # Everything read was written and acked exactly once, nothing nacked.
    assert len(sink.written) == source.read_messages
    assert all(a.settlements == [("ack", None)] for a in source.acks)
    assert pipe.in_flight == 0


async def test_ack_comes_only_after_the_write_returned() -> None:
    pipe = make_pipeline(batch={"max_messages": 4, "max_wait": "1ms"})
    source, sink = parts(pipe)
    gate = asyncio.Event()
    order: list[str] = []

    async def gated(messages: Sequence[Message], attempt: int) -> None:
        await gate.wait()
        order.append("written " + ",".join(m.id or "" for m in messages))

    sink.behaviour = gated
    task = asyncio.create_task(pipe.run())
    ack = source.feed([msg(i) for i in range(4)], "first")
    await until(lambda: sink.active == 1)
    await asyncio.sleep(0.01)
    assert ack.calls == []
    gate.set()
    await until(lambda: ack.settlements != [])
    assert ack.settlements == [("ack", None)]
    assert order == ["written id-0,id-1,id-2,id-3"]
    await finish(pipe, task)


async def test_in_progress_is_signalled_during_a_long_write() -> None:
    pipe = make_pipeline(batch={"max_messages": 2, "max_wait": "1ms"},
                         in_progress_interval="5ms")
    source, sink = parts(pipe)

    sink.behaviour = takes(0.05)
    ack = source.feed([msg(0), msg(1)])
    await finish(pipe)
    kinds = [c[0] for c in ack.calls]
    assert "in_progress" in kinds
    assert kinds[-1] == "ack" and kinds.count("ack") == 1


# ------------------------------------------------------------ retries


async def test_retryable_error_is_retried_until_it_succeeds() -> None:
    pipe = make_pipeline(batch={"max_messages": 10, "max_wait": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)

    async def flaky(messages: Sequence[Message], attempt: int) -> None:
        if attempt <= 2:
            raise RetryableError("leader moved", retry_after=0.001)

    sink.behaviour = flaky
    ack = source.feed([msg(i) for i in range(10)])
    await finish(pipe)
    assert len(sink.attempts) == 3
    assert [m.id for m in sink.written] == [f"id-{i}" for i in range(10)]
    assert ack.settlements == [("ack", None)]
    assert dlq(pipe).attempts == []
    assert sample("natsconn_retries_total", pipe) == 2


async def test_an_unexpected_exception_is_treated_as_retryable() -> None:
    pipe = make_pipeline(batch={"max_messages": 3, "max_wait": "1ms"})
    source, sink = parts(pipe)

    async def buggy(messages: Sequence[Message], attempt: int) -> None:
        if attempt == 1:
            raise ValueError("plugin bug")

    sink.behaviour = buggy
    ack = source.feed([msg(i) for i in range(3)])
    await finish(pipe)
    assert len(sink.attempts) == 2
    assert ack.settlements == [("ack", None)]


async def test_partial_write_rewrites_only_the_retryable_and_dead_letters_the_rejected(
) -> None:
    pipe = make_pipeline(batch={"max_messages": 5, "max_wait": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)

    async def partial(messages: Sequence[Message], attempt: int) -> None:
        if attempt == 1:
            raise PartialWriteError({1: RetryableError("busy"),
                                     3: RejectedError("value too large")})

    sink.behaviour = partial
    ack = source.feed([msg(i) for i in range(5)])
    await finish(pipe)
    assert [[m.id for m in a] for a in sink.attempts] == [
        ["id-0", "id-1", "id-2", "id-3", "id-4"], ["id-1"],
    ]
    letters = dlq(pipe).written
    assert [m.id for m in letters] == ["id-3"]
    h = letters[0].headers
    assert h["Natsconn-Error"] == "value too large"
    assert h["Natsconn-Error-Kind"] == "rejected"
    assert h["Natsconn-Attempts"] == "1"
    assert h["Natsconn-Pipeline"] == pipe.name
    assert h["Natsconn-Original-Subject"] == "in.3"
    assert h["Natsconn-Source-Id"] == "id-3"
    assert letters[0].data == b"m3"
    assert ack.settlements == [("ack", None)]
    assert sample("natsconn_dead_lettered_total", pipe) == 1


async def test_exhausted_attempts_dead_letter_with_kind_exhausted() -> None:
    pipe = make_pipeline(batch={"max_messages": 2, "max_wait": "1ms"},
                         retry={"max_attempts": 3, "initial_backoff": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)

    async def down(messages: Sequence[Message], attempt: int) -> None:
        raise RetryableError("connection refused")

    sink.behaviour = down
    ack = source.feed([msg(0), msg(1)])
    await finish(pipe)
    assert len(sink.attempts) == 3
    letters = dlq(pipe).written
    assert [m.id for m in letters] == ["id-0", "id-1"]
    assert {m.headers["Natsconn-Error-Kind"] for m in letters} == {"exhausted"}
    assert {m.headers["Natsconn-Attempts"] for m in letters} == {"3"}
    assert "connection refused" in letters[0].headers["Natsconn-Error"]
    assert ack.settlements == [("ack", None)]


async def test_rejected_without_dead_letter_terminates_the_source_batch() -> None:
    pipe = make_pipeline(batch={"max_messages": 3, "max_wait": "1ms"})
    source, sink = parts(pipe)

    async def poison(messages: Sequence[Message], attempt: int) -> None:
        raise PartialWriteError({2: RejectedError("invalid subject")})

    sink.behaviour = poison
    ack = source.feed([msg(i) for i in range(3)])
    await finish(pipe)
    assert len(sink.attempts) == 1
    assert len(ack.settlements) == 1
    kind, reason = ack.settlements[0]
    assert kind == "term"
    assert "invalid subject" in reason
    assert sample("natsconn_rejected_without_dead_letter_total", pipe) == 1


async def test_whole_batch_rejection_dead_letters_every_message() -> None:
    pipe = make_pipeline(batch={"max_messages": 3, "max_wait": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)

    async def reject(messages: Sequence[Message], attempt: int) -> None:
        raise RejectedError("schema mismatch")

    sink.behaviour = reject
    ack = source.feed([msg(i) for i in range(3)])
    await finish(pipe)
    assert len(sink.attempts) == 1
    assert [m.id for m in dlq(pipe).written] == ["id-0", "id-1", "id-2"]
    assert ack.settlements == [("ack", None)]


async def test_failing_dead_letter_write_is_retried() -> None:
    pipe = make_pipeline(batch={"max_messages": 1, "max_wait": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)

    async def reject(messages: Sequence[Message], attempt: int) -> None:
        raise RejectedError("poison")

    async def dlq_flaky(messages: Sequence[Message], attempt: int) -> None:
        if attempt == 1:
            raise RetryableError("dlq busy")

    sink.behaviour = reject
    dlq(pipe).behaviour = dlq_flaky
    ack = source.feed([msg(0)])
    await finish(pipe)
    assert len(dlq(pipe).attempts) == 2
    assert [m.id for m in dlq(pipe).written] == ["id-0"]
    assert ack.settlements == [("ack", None)]


# ------------------------------------------------------------ transforms


async def test_transform_rejection_is_dead_lettered_while_the_rest_flows() -> None:
    pipe = make_pipeline(transforms=[{"type": "reject_bad"}], dead_letter={"type": "fake"},
                         batch={"max_messages": 10, "max_wait": "1ms"})
    source, sink = parts(pipe)
    batch = [msg(0), Message(b"bad-1", "in.1", id="id-1"), msg(2)]
    ack = source.feed(batch)
    await finish(pipe)
    assert [m.id for m in sink.written] == ["id-0", "id-2"]
    letters = dlq(pipe).written
    assert [m.id for m in letters] == ["id-1"]
    assert letters[0].headers["Natsconn-Error-Kind"] == "rejected"
    assert letters[0].headers["Natsconn-Attempts"] == "0"
    assert "bad payload" in letters[0].headers["Natsconn-Error"]
    assert ack.settlements == [("ack", None)]


async def test_split_message_acks_its_source_batch_once_after_both_parts_are_written(
) -> None:
    pipe = make_pipeline(transforms=[{"type": "split"}],
                         batch={"max_messages": 1, "max_wait": "1ms"}, max_in_flight=2)
    source, sink = parts(pipe)
    first = asyncio.Event()

    async def hold_second(messages: Sequence[Message], attempt: int) -> None:
        if messages[0].id == "id-0-b":
            await first.wait()

    sink.behaviour = hold_second
    task = asyncio.create_task(pipe.run())
    ack = source.feed([msg(0)])
    await until(lambda: [m.id for m in sink.written] == ["id-0-a"] and sink.active == 1)
    await asyncio.sleep(0.01)
    assert ack.calls == [], "acked before every part of the split message was written"
    first.set()
    await until(lambda: ack.settlements != [])
    assert sorted(m.id or "" for m in sink.written) == ["id-0-a", "id-0-b"]
    assert ack.settlements == [("ack", None)]
    await finish(pipe, task)


async def test_transform_dropping_everything_acks_the_batch() -> None:
    pipe = make_pipeline(transforms=[{"type": "drop_odd"}])
    source, sink = parts(pipe)
    ack = source.feed([msg(1), msg(3)])
    await finish(pipe)
    assert sink.attempts == []
    assert ack.settlements == [("ack", None)]


async def test_a_heavy_filter_does_not_stall_the_pipeline() -> None:
    """Regression: the window counts messages as read, the batcher as transformed.
    With a filter the window filled up while the batcher held a partial batch
    that nothing would ever flush."""
    pipe = make_pipeline(source={"type": "fake", "per_read": 10},
                         transforms=[{"type": "keep_one_in_ten"}],
                         batch={"max_messages": 10, "max_wait": "1s"}, max_in_flight=1)
    _, sink = parts(pipe)
    task = asyncio.create_task(pipe.run())
    await until(lambda: len(sink.written) >= 3, timeout=3)
    pipe.stop(time.monotonic() + 1)
    await asyncio.wait_for(task, 2)
    assert {m.id for m in sink.written} >= {"id-0", "id-10", "id-20"}


async def test_in_flight_bytes_below_batch_bytes_does_not_stall() -> None:
    """Regression: with max_in_flight_bytes under batch.max_bytes the window filled
    by bytes while the batcher waited for a full batch."""
    pipe = make_pipeline(source={"type": "fake", "per_read": 4, "size": 100},
                         batch={"max_messages": 1000, "max_bytes": "1MiB", "max_wait": "1s"},
                         max_in_flight_bytes=1000)
    _, sink = parts(pipe)
    task = asyncio.create_task(pipe.run())
    await until(lambda: len(sink.written) >= 20, timeout=3)
    pipe.stop(time.monotonic() + 1)
    await asyncio.wait_for(task, 2)
    # A read may overshoot the byte window by one read (4 x 100 B), never more.
    assert max(sum(len(m.data) for m in a) for a in sink.attempts) <= 1000 + 400


# ---------------------------------------------------------- end and stop


async def test_end_of_input_drains_writes_and_finishes() -> None:
    pipe = make_pipeline(batch={"max_messages": 4, "max_wait": "10s"})
    source, sink = parts(pipe)
    acks = [source.feed([msg(b * 3 + i) for i in range(3)]) for b in range(3)]
    await finish(pipe)
    assert len(sink.written) == 9
    assert [len(a) for a in sink.attempts] == [4, 4, 1]
    assert all(a.settlements == [("ack", None)] for a in acks)
    assert pipe.state is PipelineState.FINISHED
    assert pipe.in_flight == 0


async def test_stop_with_a_stalled_sink_nacks_within_the_deadline() -> None:
    pipe = make_pipeline(batch={"max_messages": 2, "max_wait": "1ms"}, max_in_flight=1)
    source, sink = parts(pipe)
    never = asyncio.Event()

    async def stalled(messages: Sequence[Message], attempt: int) -> None:
        await never.wait()

    sink.behaviour = stalled
    task = asyncio.create_task(pipe.run())
    acks = [source.feed([msg(2 * b), msg(2 * b + 1)]) for b in range(3)]
    await until(lambda: sink.active == 1 and source.read_messages >= 4)
    started = time.monotonic()
    pipe.stop(started + 0.1)
    await asyncio.wait_for(task, 2)
    elapsed = time.monotonic() - started
    assert elapsed < 0.1 + 0.5, f"stop took {elapsed:.3f}s with a 0.1s deadline"
    assert pipe.state is PipelineState.STOPPED
    assert sink.written == []
    read = [a for a in acks if a.calls]
    assert read, "the batches read must be settled"
    for a in read:
        assert a.settlements == [("nack", None)]
    assert source.closed and sink.closed


async def test_stop_finishes_in_flight_writes_and_acks_them() -> None:
    pipe = make_pipeline(batch={"max_messages": 2, "max_wait": "1ms"}, max_in_flight=2)
    source, sink = parts(pipe)

    sink.behaviour = takes(0.03)
    task = asyncio.create_task(pipe.run())
    acks = [source.feed([msg(2 * b), msg(2 * b + 1)]) for b in range(2)]
    await until(lambda: sink.active == 2)
    pipe.stop(time.monotonic() + 2)
    await asyncio.wait_for(task, 3)
    assert pipe.state is PipelineState.STOPPED
    assert len(sink.written) == 4
    assert all(a.settlements == [("ack", None)] for a in acks)


async def test_stop_while_dead_letter_stalls_settles_each_batch_once() -> None:
    """Regression: a partial write resolved the written messages, then the
    dead-letter write hit the deadline and the whole batch was resolved again,
    settling the source batch twice and releasing the window twice."""
    pipe = make_pipeline(batch={"max_messages": 3, "max_wait": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)
    never = asyncio.Event()

    async def partial(messages: Sequence[Message], attempt: int) -> None:
        raise PartialWriteError({2: RejectedError("poison")})

    async def stalled(messages: Sequence[Message], attempt: int) -> None:
        await never.wait()

    sink.behaviour = partial
    dlq(pipe).behaviour = stalled
    task = asyncio.create_task(pipe.run())
    ack = source.feed([msg(0), msg(1), msg(2)])
    await until(lambda: dlq(pipe).active == 1)
    pipe.stop(time.monotonic() + 0.05)
    await asyncio.wait_for(task, 2)
    assert ack.settlements == [("nack", None)]
    assert pipe.in_flight == 0
    assert pipe._window.bytes == 0


async def test_source_failure_fails_the_run_and_nacks_unwritten_batches() -> None:
    pipe = make_pipeline(batch={"max_messages": 100, "max_wait": "10s"})
    source, _ = parts(pipe)
    ack = source.feed([msg(0)])
    source.queue.put_nowait(RuntimeError("source broke"))
    with pytest.raises(RuntimeError, match="source broke"):
        await asyncio.wait_for(pipe.run(), 2)
    assert pipe.state is PipelineState.FAILED
    assert ack.settlements == [("nack", None)]
    assert source.closed


async def test_retryable_read_error_is_retried() -> None:
    pipe = make_pipeline()
    source, sink = parts(pipe)
    source.queue.put_nowait(RetryableError("fetch timed out"))
    ack = source.feed([msg(0)])
    await finish(pipe)
    assert [m.id for m in sink.written] == ["id-0"]
    assert ack.settlements == [("ack", None)]


async def test_a_partial_write_naming_a_missing_index_does_not_stall(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipe = make_pipeline(batch={"max_messages": 2, "max_wait": "1ms"}, max_in_flight=1)
    source, sink = parts(pipe)

    async def buggy(messages: Sequence[Message], attempt: int) -> None:
        if attempt == 1:
            raise PartialWriteError({7: RetryableError("index the batch does not have")})

    sink.behaviour = buggy
    first = source.feed([msg(0), msg(1)])
    second = source.feed([msg(2), msg(3)])
    await finish(pipe)
    # Indices 0 and 1 are not in ``failed``: by the contract they were written.
    assert first.settlements == [("ack", None)]
    assert second.settlements == [("ack", None)]
    assert [m.id for m in sink.written] == ["id-2", "id-3"]
    assert pipe.in_flight == 0
    assert "write task failed" in caplog.text


async def test_shutdown_deadline_is_not_logged_as_a_failed_write(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipe = make_pipeline(batch={"max_messages": 1, "max_wait": "1ms"}, max_in_flight=1)
    source, sink = parts(pipe)
    never = asyncio.Event()

    async def stalled(messages: Sequence[Message], attempt: int) -> None:
        await never.wait()

    sink.behaviour = stalled
    task = asyncio.create_task(pipe.run())
    pipe.stop(time.monotonic() + 0.05)  # the write starts after the stop: it sees the deadline
    ack = source.feed([msg(0)])
    await asyncio.wait_for(task, 2)
    assert ack.settlements in ([], [("nack", None)])
    assert "write task failed" not in caplog.text


async def test_dead_letter_target_refusing_a_message_terminates_it_and_goes_on() -> None:
    pipe = make_pipeline(batch={"max_messages": 2, "max_wait": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)

    async def poison_first(messages: Sequence[Message], attempt: int) -> None:
        if messages[0].id == "id-0":
            raise PartialWriteError({0: RejectedError("too large for the sink")})

    async def dlq_refuses(messages: Sequence[Message], attempt: int) -> None:
        raise RejectedError("too large for the dead-letter target too")

    sink.behaviour = poison_first
    dlq(pipe).behaviour = dlq_refuses
    first = source.feed([msg(0), msg(1)])
    second = source.feed([msg(2), msg(3)])
    await finish(pipe)
    assert len(dlq(pipe).attempts) == 1, "a refusal by the dead-letter target is final"
    [(kind, reason)] = first.settlements
    assert kind == "term"
    assert "too large" in reason
    assert second.settlements == [("ack", None)]
    assert sample("natsconn_rejected_without_dead_letter_total", pipe) == 1


async def test_a_timeout_raised_by_the_dead_letter_sink_is_retried_not_a_shutdown() -> None:
    pipe = make_pipeline(batch={"max_messages": 1, "max_wait": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)

    async def reject(messages: Sequence[Message], attempt: int) -> None:
        raise RejectedError("poison")

    async def dlq_times_out_once(messages: Sequence[Message], attempt: int) -> None:
        if attempt == 1:
            raise TimeoutError("publish ack timed out")

    sink.behaviour = reject
    dlq(pipe).behaviour = dlq_times_out_once
    ack = source.feed([msg(0)])
    await finish(pipe)
    assert len(dlq(pipe).attempts) == 2
    assert [m.id for m in dlq(pipe).written] == ["id-0"]
    assert ack.settlements == [("ack", None)]


async def test_a_timeout_raised_by_the_sink_during_a_stop_is_retried() -> None:
    pipe = make_pipeline(batch={"max_messages": 1, "max_wait": "1ms"}, max_in_flight=1)
    source, sink = parts(pipe)
    gate = asyncio.Event()

    async def behaviour(messages: Sequence[Message], attempt: int) -> None:
        if attempt == 1:
            await gate.wait()  # the first batch holds the only slot
        elif attempt == 2:
            raise TimeoutError("flush timed out")  # the sink's own timeout, not the deadline

    sink.behaviour = behaviour
    task = asyncio.create_task(pipe.run())
    first = source.feed([msg(0)])
    second = source.feed([msg(1)])
    await until(lambda: sink.active == 1 and source.read_messages == 2)
    pipe.stop(time.monotonic() + 5)  # the second batch is written in the drain, under it
    gate.set()
    await asyncio.wait_for(task, 5)
    assert first.settlements == [("ack", None)]
    assert second.settlements == [("ack", None)]
    assert [[m.id for m in a] for a in sink.attempts] == [["id-0"], ["id-1"], ["id-1"]]


async def test_dead_letter_partial_refusal_terminates_only_what_was_refused() -> None:
    pipe = make_pipeline(batch={"max_messages": 3, "max_wait": "1ms"},
                         dead_letter={"type": "fake"})
    source, sink = parts(pipe)

    async def reject_all(messages: Sequence[Message], attempt: int) -> None:
        raise RejectedError("schema mismatch")

    async def dlq_partial(messages: Sequence[Message], attempt: int) -> None:
        if attempt == 1:  # of three letters: one refused, one to retry, one written
            raise PartialWriteError({0: RejectedError("too large"),
                                     2: RetryableError("busy")})

    sink.behaviour = reject_all
    dlq(pipe).behaviour = dlq_partial
    ack = source.feed([msg(0), msg(1), msg(2)])
    await finish(pipe)
    assert [[m.id for m in a] for a in dlq(pipe).attempts] == [
        ["id-0", "id-1", "id-2"], ["id-2"]]
    [(kind, reason)] = ack.settlements
    assert kind == "term" and "too large" in reason
    assert sample("natsconn_dead_lettered_total", pipe) == 2


async def test_a_transform_bug_fails_the_run_and_nacks_the_batch() -> None:
    pipe = make_pipeline(transforms=[{"type": "explode"}],
                         batch={"max_messages": 10, "max_wait": "10s"})
    source, sink = parts(pipe)
    good = source.feed([msg(0)])
    bad = source.feed([Message(b"boom", "in.1", id="id-1")])
    with pytest.raises(ValueError, match="transform bug"):
        await asyncio.wait_for(pipe.run(), 2)
    assert pipe.state is PipelineState.FAILED
    assert good.settlements == [("nack", None)]  # read, never written
    assert bad.settlements == [("nack", None)]
    assert sink.written == []
    assert pipe.in_flight == 0


async def test_stop_before_run_reads_nothing() -> None:
    pipe = make_pipeline()
    source, sink = parts(pipe)
    ack = source.feed([msg(0)])
    pipe.stop(time.monotonic() + 1)
    await asyncio.wait_for(pipe.run(), 2)
    assert pipe.state is PipelineState.STOPPED
    assert source.reads == 0 and ack.calls == []
    # A stop that comes before the run does not even connect; close is still safe.
    assert not source.connected and source.closed and sink.closed


async def test_stop_while_connecting_ends_the_run() -> None:
    pipe = make_pipeline()
    source, _ = parts(pipe)
    hang = asyncio.Event()

    async def slow_connect() -> None:
        await hang.wait()

    source.connect = slow_connect  # type: ignore[method-assign]
    run = asyncio.create_task(pipe.run())
    await asyncio.sleep(0.05)
    assert pipe.state is PipelineState.STARTING
    pipe.stop(time.monotonic() + 1)
    await asyncio.wait_for(run, 1)
    assert pipe.state is PipelineState.STOPPED and source.reads == 0


async def test_metrics_count_the_flow() -> None:
    pipe = make_pipeline(batch={"max_messages": 5, "max_wait": "1ms"},
                         transforms=[{"type": "reject_bad"}], dead_letter={"type": "fake"})
    source, _ = parts(pipe)
    source.feed([msg(i, size=10) for i in range(4)] + [Message(b"bad", "in.4", id="id-4")])
    source.feed([msg(5, size=10)])
    await finish(pipe)
    assert sample("natsconn_messages_in_total", pipe) == 6
    assert sample("natsconn_bytes_in_total", pipe) == 53
    assert sample("natsconn_messages_out_total", pipe) == 5
    assert sample("natsconn_bytes_out_total", pipe) == 50
    assert sample("natsconn_dead_lettered_total", pipe) == 1
    assert sample("natsconn_source_batches_settled_total", pipe, outcome="ack") == 2
    assert sample("natsconn_in_flight_messages", pipe) == 0
    assert sample("natsconn_pipeline_up", pipe) == 0


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_stop_during_an_end_of_input_drain_honours_the_deadline(in_flight: int) -> None:
    """The source ended and the drain waits for a stalled sink with no deadline; a
    stop must bound that wait (in_flight 1: the last partial batch also waits for
    the only write slot)."""
    pipe = make_pipeline(batch={"max_messages": 2, "max_wait": "10s"},
                         max_in_flight=in_flight)
    source, sink = parts(pipe)
    never = asyncio.Event()

    async def stalled(messages: Sequence[Message], attempt: int) -> None:
        await never.wait()

    sink.behaviour = stalled
    acks = [source.feed([msg(0), msg(1)]), source.feed([msg(2)])]
    source.end()
    task = asyncio.create_task(pipe.run())
    await until(lambda: pipe.state is PipelineState.DRAINING and sink.active >= 1)
    started = time.monotonic()
    pipe.stop(started + 0.1)
    await asyncio.wait_for(task, 2)
    assert time.monotonic() - started < 0.1 + 0.5
    assert pipe.state in (PipelineState.FINISHED, PipelineState.STOPPED)
    assert [a.settlements for a in acks] == [[("nack", None)], [("nack", None)]]


async def test_stage_histograms_say_where_each_batch_waited() -> None:
    """Two full batches and a lingering partial one, one write slot, 30 ms a
    write: the histograms put the linger in batching, the slot wait in queued and
    the sink's time in writing, once per batch."""
    pipe = make_pipeline(batch={"max_messages": 5, "max_wait": "40ms"}, max_in_flight=1)
    source, sink = parts(pipe)

    sink.behaviour = takes(0.03)
    task = asyncio.create_task(pipe.run())
    for first, n in ((0, 5), (5, 5), (10, 2)):
        source.feed([msg(first + i) for i in range(n)])
    await until(lambda: len(sink.written) == 12, timeout=3)
    await until(lambda: sample("natsconn_batch_stage_seconds_count", pipe, sink="fake",
                               stage="total") == 3)

    def stage(name: str, suffix: str = "sum", **extra: str) -> float:
        return sample(f"natsconn_batch_stage_seconds_{suffix}", pipe, sink="fake",
                      stage=name, **extra)

    for name in ("batching", "queued", "writing", "settling", "total"):
        assert stage(name, "count") == 3, name
    assert stage("writing") >= 0.09  # three writes of 30 ms
    # The two full batches closed at once; the partial one lingered 40 ms.
    assert stage("batching", "bucket", le="0.0005") == 2
    assert 0.04 <= stage("batching") < 0.08
    # Batch 2 waited for batch 1's write (30 ms) to free the slot.
    assert stage("queued") >= 0.025
    assert stage("total") >= stage("batching") + stage("writing")
    await finish(pipe, task)
