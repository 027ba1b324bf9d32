"""The ``split`` transform: one JSON array into one message per element, and
through the engine: the source batch is acknowledged only after every derived
message is written (or dead-lettered); a failure before that redelivers it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from natsconn_process.split import Split
from pydantic import ValidationError

from connector import Message, PluginContext, Rejected, RetryableError
from connector.engine import PipelineState

from ._fakes import until
from ._process import CountingMeters, dlq, finish, make_pipeline, parts, run, sample


def make(meters: CountingMeters | None = None, **options: Any) -> Split:
    return Split.make_test_instance(PluginContext(meters=meters or CountingMeters()), **options)


def array(items: list[Any], i: int = 0, **kw: Any) -> Message:
    kw.setdefault("subject", "orders.batch")
    return Message(orjson.dumps(items), id=f"id-{i}", **kw)


# ------------------------------------------------------------------ logic


def test_one_message_per_element_keeping_subject_key_headers_and_timestamp() -> None:
    source = array([{"sku": "a"}, 2, "three", [4], None], key=b"k", headers={"H": "v"},
                   timestamp=3.5)
    out = run(make(), source)
    assert [m.data for m in out] == [b'{"sku":"a"}', b"2", b'"three"', b"[4]", b"null"]
    assert [m.id for m in out] == [f"id-0/{i}" for i in range(5)]
    for i, m in enumerate(out):
        assert (m.subject, m.key, m.timestamp) == ("orders.batch", b"k", 3.5)
        assert m.headers == {"H": "v", "Natsconn-Split-Index": str(i),
                             "Natsconn-Split-Count": "5"}


def test_without_headers_the_headers_are_the_source_ones() -> None:
    out = run(make(headers=False), array([1, 2], headers={"H": "v"}))
    assert [dict(m.headers) for m in out] == [{"H": "v"}, {"H": "v"}]


def test_a_source_without_an_id_gives_derived_messages_without_one() -> None:
    out = run(make(), Message(b"[1, 2]"))
    assert [m.id for m in out] == [None, None]


def test_path_to_an_array_inside_an_object() -> None:
    out = run(make(path="order.items"),
              Message(b'{"order": {"id": 1, "items": [{"sku": "a"}, {"sku": "b"}]}}', id="o"))
    assert [(m.id, m.data) for m in out] == [("o/0", b'{"sku":"a"}'), ("o/1", b'{"sku":"b"}')]


@pytest.mark.parametrize(("options", "data", "reason"), [
    ({}, b"not json", "split: data is not JSON"),
    ({}, b'{"a": [1]}', "split: expected a JSON array as the document, found an object"),
    ({}, b'"text"', "split: expected a JSON array as the document, found a string"),
    ({"path": "items"}, b"[1, 2]", "split: expected a JSON array at 'items', found nothing"),
    ({"path": "items"}, b'{"other": 1}', "split: expected a JSON array at 'items', found nothing"),
    ({"path": "a.items"}, b'{"a": 5}', "split: expected a JSON array at 'a.items', found nothing"),
    ({"path": "items"}, b'{"items": {"x": 1}}',
     "split: expected a JSON array at 'items', found an object"),
])
def test_what_is_not_an_array_is_rejected(options: dict[str, Any], data: bytes,
                                          reason: str) -> None:
    source = Message(data)
    (out,) = run(make(**options), source)
    assert isinstance(out, Rejected) and out.message is source
    assert out.reason == reason


def test_empty_arrays_are_dropped_and_counted_filtered_once_per_batch() -> None:
    meters = CountingMeters()
    out = run(make(meters), array([], 0), array([1], 1), array([], 2))
    assert [m.id for m in out] == ["id-1/0"]
    assert meters.filtered_calls == [2]


def test_bad_path_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="expected a field path"):
        Split.make_test_instance(path="a..b")


# ------------------------------------------------------------ through the engine


def split_pipeline(**spec: Any) -> Any:
    spec.setdefault("batch", {"max_messages": 1, "max_wait": "1ms"})
    return make_pipeline(transforms=[{"type": "split"}], **spec)


async def test_the_source_ack_waits_for_every_derived_message() -> None:
    pipe = split_pipeline(max_in_flight=4)
    source, sink = parts(pipe)
    release = asyncio.Event()

    async def hold_the_last(messages: Sequence[Message], attempt: int) -> None:
        if messages[0].id == "id-0/2":
            await release.wait()

    sink.behaviour = hold_the_last
    task = asyncio.create_task(pipe.run())
    ack = source.feed([array([1, 2, 3])])
    await until(lambda: {m.id for m in sink.written} == {"id-0/0", "id-0/1"}
                and sink.active == 1)
    await asyncio.sleep(0.02)
    assert ack.calls == [], "acked before every derived message was written"
    release.set()
    await until(lambda: ack.settlements != [])
    assert ack.settlements == [("ack", None)]
    assert sorted(m.id or "" for m in sink.written) == ["id-0/0", "id-0/1", "id-0/2"]
    await finish(pipe, task)


async def test_a_derived_message_that_cannot_be_written_gets_the_source_redelivered() -> None:
    """The sink fails one derived message until the pipeline stops (as before a
    crash): the source batch is nacked, not acked, though its siblings were
    written; the redelivered message splits into the same ids, so sinks that
    deduplicate by id write each element once."""
    pipe = split_pipeline(max_in_flight=4)
    source, sink = parts(pipe)

    async def fail_one(messages: Sequence[Message], attempt: int) -> None:
        if any(m.id == "id-0/1" for m in messages):
            raise RetryableError("element 1 will not go")

    sink.behaviour = fail_one
    task = asyncio.create_task(pipe.run())
    ack = source.feed([array([1, 2, 3])])
    other = source.feed([array([9], i=5)])
    await until(lambda: {"id-0/0", "id-0/2", "id-5/0"} <= {m.id for m in sink.written}
                and len(sink.attempts) >= 6)
    assert ack.calls == [], "acked while a derived message was unwritten"
    assert other.settlements == [("ack", None)], "an unrelated batch is acked on its own"
    pipe.stop(time.monotonic() + 0.05)
    await asyncio.wait_for(task, 3)
    assert pipe.state is PipelineState.STOPPED
    assert ack.settlements == [("nack", None)]
    first_ids = {m.id for m in sink.written}

    again = split_pipeline()
    source2, sink2 = parts(again)
    redelivered = source2.feed([array([1, 2, 3])])
    await finish(again)
    assert redelivered.settlements == [("ack", None)]
    assert {m.id for m in sink2.written} == {"id-0/0", "id-0/1", "id-0/2"}
    assert first_ids - {"id-5/0"} <= {m.id for m in sink2.written}


async def test_a_dead_lettered_derived_message_lets_the_source_be_acked() -> None:
    pipe = split_pipeline(dead_letter={"type": "fake"},
                          retry={"initial_backoff": "1ms", "max_backoff": "2ms",
                                 "max_attempts": 2})
    source, sink = parts(pipe)

    async def fail_one(messages: Sequence[Message], attempt: int) -> None:
        if messages[0].id == "id-0/1":
            raise RetryableError("element 1 will not go")

    sink.behaviour = fail_one
    ack = source.feed([array([1, 2, 3])])
    await finish(pipe)
    assert sorted(m.id or "" for m in sink.written) == ["id-0/0", "id-0/2"]
    assert [m.id for m in dlq(pipe).written] == ["id-0/1"]
    assert ack.settlements == [("ack", None)]


async def test_through_the_engine_empty_is_acked_and_counted_non_array_dead_lettered() -> None:
    pipe = split_pipeline(dead_letter={"type": "fake"},
                          batch={"max_messages": 10, "max_wait": "1ms"})
    source, sink = parts(pipe)
    ack = source.feed([array([], 0), array([1, 2], 1), Message(b'{"no": 1}', "s", id="id-2")])
    empty_only = source.feed([array([], 3)])
    await finish(pipe)
    assert [m.id for m in sink.written] == ["id-1/0", "id-1/1"]
    (letter,) = dlq(pipe).written
    assert letter.id == "id-2"
    assert letter.headers["Natsconn-Error"] == ("split: expected a JSON array as the document, "
                                                "found an object")
    assert ack.settlements == [("ack", None)]
    assert empty_only.settlements == [("ack", None)]
    assert sample("natsconn_filtered_total", pipe, reason="transform") == 2
