"""The ``filter`` transform: its verdicts, its error modes, and through the
engine: dropped messages acknowledged with their batch and counted."""

from __future__ import annotations

import pytest
from natsconn_process.filter import Filter
from pydantic import ValidationError

from connector import Message, PluginContext, Rejected

from ._fakes import msg
from ._process import CountingMeters, dlq, finish, make_pipeline, parts, run, sample


def order(amount: object, subject: str = "orders.eu.new", i: int = 0) -> Message:
    return Message(f'{{"amount": {amount}}}'.encode(), subject, id=f"id-{i}")


def make(meters: CountingMeters | None = None, **options: object) -> Filter:
    return Filter.make_test_instance(PluginContext(meters=meters or CountingMeters()),
                                     **options)


def test_keeps_true_drops_false_and_counts_the_drops_once_per_batch() -> None:
    meters = CountingMeters()
    f = make(meters, when="data.amount > 10")
    batch = [order(5, i=0), order(11, i=1), order(10, i=2), order(99, i=3)]
    out = run(f, *batch)
    assert [m.id for m in out] == ["id-1", "id-3"]
    assert all(o is m for o, m in zip(out, [batch[1], batch[3]], strict=True)), \
        "a kept message is passed on as it is, not copied"
    assert meters.filtered_calls == [2]


def test_a_batch_with_nothing_dropped_reports_nothing() -> None:
    meters = CountingMeters()
    run(make(meters, when="data.amount > 10"), order(11), order(12))
    assert meters.filtered_calls == []


def test_conditions_on_subject_and_headers() -> None:
    f = make(when='tokens[1] == "eu" && headers["Tenant"] == "a"')
    a = Message(b"x", "orders.eu.new", headers={"Tenant": "a"})
    b = Message(b"x", "orders.us.new", headers={"Tenant": "a"})
    c = Message(b"x", "orders.eu.new", headers={"Tenant": "b"})
    assert run(f, a, b, c) == [a]


def test_a_subject_only_condition_gives_the_same_verdicts_from_its_memo() -> None:
    f = make(when='subject.endsWith(".keep")')
    subjects = ["a.keep", "a.drop", "a.keep", "b.keep", "a.drop"] * 3
    out = run(f, *(Message(b"", s) for s in subjects))
    assert [m.subject for m in out] == [s for s in subjects if s.endswith(".keep")]


def test_failure_rejects_by_default_with_the_reason() -> None:
    meters = CountingMeters()
    f = make(meters, when="data.amount > 10")
    missing = Message(b'{"other": 1}', "s", id="m")
    out = run(f, order(11), missing)
    assert out[0].id == "id-0"
    assert isinstance(out[1], Rejected) and out[1].message is missing
    assert out[1].reason.startswith("filter: expression 'data.amount > 10' failed")
    assert "amount" in out[1].reason
    assert meters.filtered_calls == []


def test_failure_on_a_payload_that_is_not_json_says_so() -> None:
    out = run(make(when="data.amount > 10"), Message(b"\x00\x01binary"))
    assert isinstance(out[0], Rejected)
    assert "the payload is not JSON" in out[0].reason


def test_a_condition_giving_a_non_bool_at_run_time_is_a_failure() -> None:
    out = run(make(when="data.flag"), Message(b'{"flag": "yes"}'), Message(b'{"flag": true}'))
    assert isinstance(out[0], Rejected) and "expected true or false" in out[0].reason
    assert isinstance(out[1], Message)


def test_on_error_drop_drops_and_counts_the_failures_as_filtered() -> None:
    meters = CountingMeters()
    f = make(meters, when="data.amount > 10", on_error="drop")
    out = run(f, order(11), Message(b"{}"), order(1))
    assert [m.id for m in out] == ["id-0"]
    assert meters.filtered_calls == [2]


def test_on_error_keep_passes_the_failures_on() -> None:
    meters = CountingMeters()
    f = make(meters, when="data.amount > 10", on_error="keep")
    bad = Message(b"{}")
    assert run(f, order(11), bad, order(1)) == [order(11), bad]
    assert meters.filtered_calls == [1]


@pytest.mark.parametrize(("when", "expected"), [
    ("data.amount >", "Syntax error"),
    ("amount > 10", "undeclared reference to 'amount'"),
    ("subject", "expected an expression giving a bool, found one giving string"),
    ("subject + 1 == 2", "no matching overload"),
])
def test_a_broken_condition_is_a_config_error(when: str, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        Filter.make_test_instance(when=when)


def test_on_error_takes_only_its_three_values() -> None:
    with pytest.raises(ValidationError, match="reject"):
        Filter.make_test_instance(when="true", on_error="ignore")


# ------------------------------------------------------------ through the engine


async def test_dropped_messages_are_acked_with_their_batch_and_counted_filtered() -> None:
    pipe = make_pipeline(transforms=[{"type": "filter", "when": "data.amount > 10"}],
                         batch={"max_messages": 10, "max_wait": "1ms"})
    source, sink = parts(pipe)
    kept_and_dropped = source.feed([order(5, i=0), order(50, i=1), order(7, i=2)])
    all_dropped = source.feed([order(1, i=3), order(2, i=4)])
    await finish(pipe)
    assert [m.id for m in sink.written] == ["id-1"]
    assert kept_and_dropped.settlements == [("ack", None)]
    assert all_dropped.settlements == [("ack", None)]
    assert sample("natsconn_filtered_total", pipe, reason="transform") == 4


async def test_a_condition_failing_at_run_time_dead_letters_that_message_only() -> None:
    pipe = make_pipeline(transforms=[{"type": "filter", "when": "data.amount > 10"}],
                         dead_letter={"type": "fake"},
                         batch={"max_messages": 10, "max_wait": "1ms"})
    source, sink = parts(pipe)
    ack = source.feed([order(50, i=0), msg(1), order(1, i=2)])
    await finish(pipe)
    assert [m.id for m in sink.written] == ["id-0"]
    letters = dlq(pipe).written
    assert [m.id for m in letters] == ["id-1"]
    assert letters[0].headers["Natsconn-Error"].startswith("filter: expression")
    assert letters[0].headers["Natsconn-Error-Kind"] == "rejected"
    assert ack.settlements == [("ack", None)]
    assert sample("natsconn_filtered_total", pipe, reason="transform") == 1
