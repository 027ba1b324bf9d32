"""The ``headers`` transform: copy, remove, remove_prefix, set, their order, failures."""

from __future__ import annotations

from typing import Any

import pytest
from natsconn_process.headers import Headers
from pydantic import ValidationError

from connector import Message, Rejected

from ._process import dlq, finish, make_pipeline, parts, run


def make(**options: Any) -> Headers:
    return Headers.make_test_instance(**options)


def one(h: Headers, message: Message) -> Message:
    (out,) = run(h, message)
    assert isinstance(out, Message), out
    return out


SOURCE = Message(b"payload", "orders.eu.new", b"k",
                 {"A": "1", "X-Internal-Trace": "t", "X-Internal-User": "u", "Keep": "k"},
                 12.5, "ORDERS:9")


def test_set_literal_and_computed_values() -> None:
    out = one(make(set={"X-Env": '"prod"', "X-Region": "tokens[1]", "X-Id": "id",
                        "X-Size": "string(size(data))"}), SOURCE)
    assert out.headers == {**SOURCE.headers, "X-Env": "prod", "X-Region": "eu",
                           "X-Id": "ORDERS:9", "X-Size": "7"}
    assert (out.data, out.subject, out.key, out.timestamp, out.id) == (
        SOURCE.data, SOURCE.subject, SOURCE.key, SOURCE.timestamp, SOURCE.id)


def test_copy_then_remove_renames() -> None:
    out = one(make(copy={"A": "B", "Absent": "C"}, remove=["A"]), SOURCE)
    assert "A" not in out.headers and out.headers["B"] == "1" and "C" not in out.headers


def test_remove_prefix() -> None:
    out = one(make(remove_prefix=["X-Internal-"]), SOURCE)
    assert out.headers == {"A": "1", "Keep": "k"}


def test_names_are_case_sensitive() -> None:
    out = one(make(remove=["a", "keep"]), SOURCE)
    assert out.headers == SOURCE.headers


def test_set_sees_the_incoming_headers_and_wins_over_copy_and_remove() -> None:
    out = one(make(copy={"A": "Z"}, remove=["A"], set={"A": 'headers["A"] + "!"', "Z": '"set"'}),
              SOURCE)
    assert out.headers["A"] == "1!" and out.headers["Z"] == "set"


def test_the_incoming_message_is_not_changed() -> None:
    before = dict(SOURCE.headers)
    one(make(remove_prefix=["X-"], set={"N": '"v"'}), SOURCE)
    assert SOURCE.headers == before


def test_a_set_value_that_is_not_a_string_at_run_time_is_rejected() -> None:
    h = make(set={"X-Qty": "data.qty"})
    good, bad = Message(b'{"qty": "3"}'), Message(b'{"qty": 3}')
    out = run(h, good, bad)
    assert isinstance(out[0], Message) and out[0].headers["X-Qty"] == "3"
    assert isinstance(out[1], Rejected)
    assert out[1].reason == ("headers: set.X-Qty: expected a string, the expression gave a "
                             "number; convert it with string()")


def test_a_failing_set_expression_is_rejected_with_its_name() -> None:
    (out,) = run(make(set={"X": 'headers["Missing"]'}), SOURCE)
    assert isinstance(out, Rejected)
    assert out.reason.startswith("headers: set.X: expression 'headers[\"Missing\"]' failed")


@pytest.mark.parametrize(("options", "expected"), [
    ({}, "needs at least one of"),
    ({"set": {"X-Env": "prod"}}, "undeclared reference to 'prod'"),
    ({"set": {"X": "1"}}, "expected an expression giving a string, found one giving int"),
    ({"remove_prefix": [""]}, "an empty prefix would remove every header"),
])
def test_config_errors(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        Headers.make_test_instance(**options)


async def test_through_the_engine() -> None:
    pipe = make_pipeline(
        transforms=[{"type": "headers", "set": {"X-Qty": "data.qty"}, "remove": ["A"]}],
        dead_letter={"type": "fake"}, batch={"max_messages": 10, "max_wait": "1ms"})
    source, sink = parts(pipe)
    ack = source.feed([Message(b'{"qty": "1"}', "s", headers={"A": "x"}, id="ok"),
                       Message(b'{"qty": 1}', "s", headers={"A": "x"}, id="bad")])
    await finish(pipe)
    assert [(m.id, dict(m.headers)) for m in sink.written] == [("ok", {"X-Qty": "1"})]
    assert [m.id for m in dlq(pipe).written] == ["bad"]
    assert ack.settlements == [("ack", None)]
