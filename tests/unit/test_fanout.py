"""Fan-out and routing in the engine, in-process with fake plugins: which sink gets
what, and that a source batch is acknowledged only when every sink it was routed
to has written (or dead-lettered) its messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, cast

import pytest

from connector import ConfigError, Message, RejectedError, RetryableError
from connector.engine import Pipeline, PipelineState
from connector.ops.metrics import REGISTRY as METRICS

from ._fakes import FakeSink, FakeSource, load, make_pipeline, msg, pipeline_spec, until

FAKE = {"type": "fake"}


def fan(*sinks: dict[str, Any], **spec: Any) -> Pipeline:
    return make_pipeline(sink=None, sinks=list(sinks), **spec)


def sinks(pipe: Pipeline) -> list[FakeSink]:
    return [cast(FakeSink, lane.sink) for lane in pipe.lanes]


def source_of(pipe: Pipeline) -> FakeSource:
    return cast(FakeSource, pipe.source)


def sample(name: str, **labels: str) -> float:
    return METRICS.get_sample_value(name, labels) or 0.0


async def finish(pipe: Pipeline, task: asyncio.Task[None] | None = None) -> None:
    source_of(pipe).end()
    await asyncio.wait_for(task if task is not None else pipe.run(), 5)
    assert pipe.state is PipelineState.FINISHED


def ids(messages: Sequence[Message]) -> list[str | None]:
    return [m.id for m in messages]


async def test_broadcast_without_conditions_gives_every_sink_every_message() -> None:
    pipe = fan({"sink": FAKE}, {"sink": FAKE})
    source = source_of(pipe)
    acks = [source.feed([msg(b * 3 + i) for i in range(3)]) for b in range(4)]
    await finish(pipe)
    a, b = sinks(pipe)
    assert ids(a.written) == ids(b.written) == [f"id-{i}" for i in range(12)]
    assert all(ack.settlements == [("ack", None)] for ack in acks)
    assert [lane.name for lane in pipe.lanes] == ["fake-0", "fake-1"]


async def test_when_routes_by_subject_and_switch_takes_the_first_match() -> None:
    first = {"name": "ones", "when": 'subject.startsWith("in.1")', "sink": FAKE}
    rest = {"name": "all", "sink": FAKE}
    broadcast = fan(first, rest)
    switch = fan(first, rest, route="switch")
    for pipe in (broadcast, switch):
        source_of(pipe).feed([msg(i) for i in range(20)])
        await finish(pipe)
    ones = [f"id-{i}" for i in range(20) if str(i).startswith("1")]
    a, b = sinks(broadcast)
    assert ids(a.written) == ones
    assert ids(b.written) == [f"id-{i}" for i in range(20)], "broadcast: every match"
    a, b = sinks(switch)
    assert ids(a.written) == ones
    assert ids(b.written) == [f"id-{i}" for i in range(20) if f"id-{i}" not in ones], \
        "switch: a message goes to its first match only"


async def test_unmatched_messages_are_acked_and_counted_or_dead_lettered() -> None:
    only = {"when": 'tokens[1] == "0"', "sink": FAKE}
    dropping = fan(only)
    lettering = fan(only, unmatched="dead_letter", dead_letter=FAKE)
    for pipe in (dropping, lettering):
        ack = source_of(pipe).feed([msg(i) for i in range(5)])
        await finish(pipe)
        assert ack.settlements == [("ack", None)]
        assert ids(sinks(pipe)[0].written) == ["id-0"]
    assert sample("natsconn_filtered_total", pipeline=dropping.name, reason="unrouted") == 4
    assert sample("natsconn_filtered_total", pipeline=lettering.name, reason="unrouted") == 0
    letters = cast(FakeSink, lettering.dead_letter).written
    assert ids(letters) == ["id-1", "id-2", "id-3", "id-4"]
    assert all("no sink's `when:` matched" in m.headers["Natsconn-Error"] for m in letters)


async def test_a_when_that_fails_on_a_message_rejects_only_that_message() -> None:
    pipe = fan({"when": "data.amount > 10", "sink": FAKE}, dead_letter=FAKE)
    good = Message(b'{"amount": 12}', "o.1", id="good")
    small = Message(b'{"amount": 3}', "o.2", id="small")
    bad = Message(b'{"price": 3}', "o.3", id="bad")
    ack = source_of(pipe).feed([good, small, bad])
    await finish(pipe)
    assert ids(sinks(pipe)[0].written) == ["good"]
    letters = cast(FakeSink, pipe.dead_letter).written
    assert ids(letters) == ["bad"]
    assert "data.amount > 10" in letters[0].headers["Natsconn-Error"]
    assert ack.settlements == [("ack", None)]


async def test_the_source_ack_waits_for_every_sink_it_was_routed_to() -> None:
    gate = asyncio.Event()
    pipe = fan({"sink": FAKE}, {"name": "slow", "sink": FAKE},
               batch={"max_messages": 5, "max_wait": "1ms"})
    fast, slow = sinks(pipe)

    async def held(_messages: Sequence[Message], _attempt: int) -> None:
        await gate.wait()

    slow.behaviour = held
    task = asyncio.create_task(pipe.run())
    ack = source_of(pipe).feed([msg(i) for i in range(5)])
    await until(lambda: len(fast.written) == 5)
    await asyncio.sleep(0.05)
    assert ack.settlements == [], "acked before the slow sink confirmed"
    gate.set()
    await until(lambda: ack.settlements == [("ack", None)])
    await finish(pipe, task)
    assert ids(slow.written) == [f"id-{i}" for i in range(5)]


async def test_a_stalled_sink_holds_the_others_back_only_through_the_window() -> None:
    gate = asyncio.Event()
    pipe = fan({"name": "kafka", "sink": FAKE}, {"name": "postgres", "sink": FAKE},
               source={"type": "fake", "per_read": 10},
               batch={"max_messages": 10, "max_wait": "1ms"}, max_in_flight=2)
    fast, stalled = sinks(pipe)

    async def held(_messages: Sequence[Message], _attempt: int) -> None:
        await gate.wait()

    stalled.behaviour = held
    task = asyncio.create_task(pipe.run())
    window = pipe._window.max_messages
    assert window == 30
    # The healthy sink keeps writing although the other's two slots are stuck...
    await until(lambda: len(fast.written) == window)
    await asyncio.sleep(0.1)
    # ...until the window is full: then reads stop, and memory stays bounded.
    assert len(fast.written) == window
    assert source_of(pipe).read_messages == window
    assert pipe.in_flight == window
    assert stalled.active == 2
    gauge = sample("natsconn_sink_queued_messages", pipeline=pipe.name, sink="postgres")
    assert gauge == 10, "the third batch waits in the stalled sink's queue"
    gate.set()
    await until(lambda: len(stalled.written) >= 3 * window)
    pipe.stop(time.monotonic() + 5)
    await asyncio.wait_for(task, 5)
    acked = sum(1 for a in source_of(pipe).acks if a.settlements == [("ack", None)])
    assert acked * 10 == len(stalled.written) == len(fast.written)


async def test_each_sink_has_its_own_dead_letter_and_retry_policy() -> None:
    pipe = fan({"name": "strict", "sink": FAKE, "retry": {"max_attempts": 2,
                                                           "initial_backoff": "1ms"},
                "dead_letter": FAKE},
               {"name": "lenient", "sink": FAKE}, dead_letter=FAKE)
    strict, lenient = sinks(pipe)
    lenient_fails = [2]

    async def always_down(_messages: Sequence[Message], _attempt: int) -> None:
        raise RetryableError("down")

    async def down_twice(_messages: Sequence[Message], _attempt: int) -> None:
        if lenient_fails[0]:
            lenient_fails[0] -= 1
            raise RetryableError("blip")

    strict.behaviour = always_down
    lenient.behaviour = down_twice
    ack = source_of(pipe).feed([msg(i) for i in range(3)])
    await finish(pipe)
    own = cast(FakeSink, pipe.lanes[0].dead_letter.target)
    assert own is not pipe.dead_letter
    assert ids(own.written) == ["id-0@strict", "id-1@strict", "id-2@strict"]
    assert [m.headers["Natsconn-Source-Id"] for m in own.written] == ["id-0", "id-1", "id-2"]
    assert all(m.headers["Natsconn-Sink"] == "strict" for m in own.written)
    assert all(m.headers["Natsconn-Error-Kind"] == "exhausted" for m in own.written)
    assert cast(FakeSink, pipe.dead_letter).written == []
    assert ids(lenient.written) == ["id-0", "id-1", "id-2"], "retried past two failures"
    assert ack.settlements == [("ack", None)]
    assert sample("natsconn_sink_dead_lettered_total", pipeline=pipe.name, sink="strict") == 3
    assert sample("natsconn_sink_retries_total", pipeline=pipe.name, sink="lenient") == 2


async def test_a_rejecting_sink_dead_letters_with_the_sink_named_and_the_rest_flow() -> None:
    pipe = fan({"name": "a", "sink": FAKE}, {"name": "b", "sink": FAKE}, dead_letter=FAKE)
    a, b = sinks(pipe)

    async def refuse(_messages: Sequence[Message], _attempt: int) -> None:
        raise RejectedError("too large for b")

    b.behaviour = refuse
    ack = source_of(pipe).feed([msg(0), msg(1)])
    await finish(pipe)
    letters = cast(FakeSink, pipe.dead_letter).written
    assert ids(a.written) == ["id-0", "id-1"]
    # The letters' ids name the sink: two sinks dead-lettering one message into one
    # deduplicating target (JetStream's Nats-Msg-Id) must leave two letters.
    assert ids(letters) == ["id-0@b", "id-1@b"]
    assert {m.headers["Natsconn-Sink"] for m in letters} == {"b"}
    assert ack.settlements == [("ack", None)]


async def test_a_failing_when_costs_only_its_own_sink_in_broadcast() -> None:
    pipe = fan({"name": "big", "when": "data.amount > 10", "sink": FAKE},
               {"name": "all", "sink": FAKE}, dead_letter=FAKE)
    switch = fan({"name": "big", "when": "data.amount > 10", "sink": FAKE},
                 {"name": "all", "sink": FAKE}, route="switch", dead_letter=FAKE)
    for p in (pipe, switch):
        source_of(p).feed([Message(b'{"price": 1}', "o.1", id="odd"),
                           Message(b'{"amount": 11}', "o.2", id="big")])
        await finish(p)
    big, everything = sinks(pipe)
    assert ids(big.written) == ["big"] and ids(everything.written) == ["odd", "big"]
    assert ids(cast(FakeSink, pipe.dead_letter).written) == ["odd"]
    big, everything = sinks(switch)
    assert ids(big.written) == ["big"] and ids(everything.written) == [], \
        "switch: a failing first condition decides nothing, the message is dead-lettered"
    assert ids(cast(FakeSink, switch.dead_letter).written) == ["odd"]


def test_the_window_holds_every_sinks_batches() -> None:
    pipe = fan({"sink": FAKE, "batch": {"max_messages": 500}, "max_in_flight": 3},
               {"sink": FAKE}, batch={"max_messages": 100}, max_in_flight=2)
    assert pipe._window.max_messages == 500 * 4


async def test_one_sink_failing_for_good_makes_the_source_redeliver() -> None:
    gate = asyncio.Event()
    pipe = fan({"name": "ok", "sink": FAKE}, {"name": "down", "sink": FAKE})
    ok, down = sinks(pipe)

    async def forever(_messages: Sequence[Message], _attempt: int) -> None:
        gate.set()
        raise RetryableError("still down")

    down.behaviour = forever
    task = asyncio.create_task(pipe.run())
    ack = source_of(pipe).feed([msg(0), msg(1)])
    await until(lambda: len(ok.written) == 2 and gate.is_set())
    pipe.stop(time.monotonic() + 0.2)
    await asyncio.wait_for(task, 5)
    assert ack.settlements == [("nack", None)], "not acked: one routed sink never wrote it"


async def test_per_sink_transforms_and_batch_policy_and_the_ack_waits_for_derived() -> None:
    pipe = fan({"name": "plain", "sink": FAKE},
               {"name": "split", "sink": FAKE, "transforms": [{"type": "split"}],
                "batch": {"max_messages": 3, "max_wait": "1s"}})
    plain, split = sinks(pipe)
    seen: list[int] = []

    async def fail_first_derived(messages: Sequence[Message], attempt: int) -> None:
        seen.append(len(messages))
        if attempt == 1:
            raise RetryableError("first batch fails once")

    split.behaviour = fail_first_derived
    ack = source_of(pipe).feed([msg(0), msg(1), msg(2)])
    await finish(pipe)
    assert ids(plain.written) == ["id-0", "id-1", "id-2"]
    assert sorted(ids(split.written)) == sorted(
        f"id-{i}-{s}" for i in range(3) for s in "ab")
    assert seen[:2] == [3, 3] and max(seen) == 3, "its own batch policy: at most 3"
    assert ack.settlements == [("ack", None)]


async def test_sink_metrics_are_labelled_per_sink_and_summed_per_pipeline() -> None:
    pipe = fan({"name": "x", "sink": FAKE}, {"name": "y", "when": 'tokens[1] == "1"',
                                             "sink": FAKE})
    source_of(pipe).feed([msg(i) for i in range(4)])
    await finish(pipe)
    assert sample("natsconn_sink_messages_out_total", pipeline=pipe.name, sink="x") == 4
    assert sample("natsconn_sink_messages_out_total", pipeline=pipe.name, sink="y") == 1
    assert sample("natsconn_messages_out_total", pipeline=pipe.name) == 5


def test_config_needs_exactly_one_of_sink_and_sinks_and_unique_names() -> None:
    with pytest.raises(ConfigError, match="found both"):
        load(pipeline_spec(sinks=[{"sink": FAKE}]))
    with pytest.raises(ConfigError, match="found neither"):
        load(pipeline_spec(sink=None))
    with pytest.raises(ConfigError, match="used twice"):
        load(pipeline_spec(sink=None, sinks=[{"name": "a", "sink": FAKE},
                                              {"name": "a", "sink": FAKE}]))
    with pytest.raises(ConfigError, match=r"sinks\[1\]\.sink\.type.*unknown sink type"):
        load(pipeline_spec(sink=None, sinks=[{"sink": FAKE}, {"sink": {"type": "nope"}}]))


@pytest.mark.parametrize(("when", "found"), [
    ('subject ==', "Syntax error"),
    ("nope > 1", "undeclared reference to 'nope'"),
    ("subject + 1 == 2", "no matching overload for '_+_' applied to '(string, int)'"),
    ("size(tokens)", "expected an expression giving a bool, found one giving int"),
])
def test_a_broken_when_is_a_config_error_with_line_and_column(when: str, found: str) -> None:
    text = ("pipelines:\n"
            "  - name: p\n"
            "    source: {type: fake}\n"
            "    sinks:\n"
            f"      - when: '{when}'\n"
            "        sink: {type: fake}\n")
    from connector.config import load_text

    from ._fakes import REGISTRY
    with pytest.raises(ConfigError) as caught:
        load_text(text, "f.yaml", REGISTRY, env={})
    err = caught.value
    assert found in err.message
    assert err.line == 5 and err.path == "pipelines[0].sinks[0].when"
    assert err.column is not None and err.column >= 16
    assert str(err).startswith(f"f.yaml:5:{err.column}: ")
