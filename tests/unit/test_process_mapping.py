"""The ``mapping`` transform: each option, the order of operations, the JSON
written for CEL's values, each run-time failure, and through the engine: a
failing message dead-lettered with the reason while the rest flow on."""

from __future__ import annotations

import datetime
from typing import Any

import orjson
import pytest
from natsconn_process.mapping import Mapping
from pydantic import ValidationError

from connector import Message, Rejected

from ._process import dlq, finish, make_pipeline, parts, run

ORDER = {"id": 7, "price": 2.5, "qty": 4, "cid": 42, "region": "eu",
         "internal": True, "meta": {"debug": 1, "source": "web"}}


def order(doc: dict[str, Any] | None = None, **kw: Any) -> Message:
    kw.setdefault("subject", "orders.eu.new")
    kw.setdefault("id", "ORDERS:1")
    return Message(orjson.dumps(ORDER if doc is None else doc), **kw)


def one(mapping: Mapping, message: Message) -> Message:
    (out,) = run(mapping, message)
    assert isinstance(out, Message), out
    return out


def doc_of(message: Message) -> Any:
    return orjson.loads(message.data)


def rejected(mapping: Mapping, message: Message) -> str:
    (out,) = run(mapping, message)
    assert isinstance(out, Rejected), out
    assert out.message is message
    return out.reason


def make(**options: Any) -> Mapping:
    return Mapping.make_test_instance(**options)


# ------------------------------------------------------------------ fields


def test_the_example_of_the_docs() -> None:
    m = make(**{
        "set": {"total": "data.price * double(data.qty)", "region": "tokens[1]",
                "customer.id": "data.cid"},
        "rename": {"cid": "customer_id"},
        "remove": ["internal", "meta.debug"],
        "headers": {"X-Region": "tokens[1]"},
        "subject": '"orders." + data.region',
        "key": "bytes(string(data.cid))",
    })
    source = order(headers={"Trace": "t1"}, timestamp=1.5)
    out = one(m, source)
    assert doc_of(out) == {"id": 7, "price": 2.5, "qty": 4, "customer_id": 42, "region": "eu",
                           "meta": {"source": "web"}, "total": 10.0, "customer": {"id": 42}}
    assert out.headers == {"Trace": "t1", "X-Region": "eu"}
    assert out.subject == "orders.eu"
    assert out.key == b"42"
    assert (out.id, out.timestamp) == (source.id, source.timestamp)


def test_every_expression_sees_the_original_message() -> None:
    m = make(**{"rename": {"cid": "customer"}, "remove": ["price"],
                "set": {"price": "data.price * 2.0", "was": "data.cid",
                        "cid_seen": "'cid' in data"}})
    assert doc_of(one(m, order())) == {
        "id": 7, "qty": 4, "customer": 42, "region": "eu", "internal": True,
        "meta": {"debug": 1, "source": "web"}, "price": 5.0, "was": 42, "cid_seen": True}


def test_set_creates_nested_objects_and_replaces_null_on_the_way() -> None:
    m = make(set={"a.b.c": "1", "meta.x": "2", "n.y": "3"})
    out = doc_of(one(m, order({"meta": {"source": "web"}, "n": None})))
    assert out == {"meta": {"source": "web", "x": 2}, "n": {"y": 3}, "a": {"b": {"c": 1}}}


def test_set_through_a_value_that_is_not_an_object_is_rejected() -> None:
    reason = rejected(make(set={"region.code": '"x"'}), order())
    assert reason == "mapping: cannot set region.code: region is a string, not an object"


def test_rename_moves_nested_fields_and_skips_missing_ones() -> None:
    m = make(rename={"meta.source": "origin.channel", "absent": "never", "id": "order_id"})
    out = doc_of(one(m, order()))
    assert out["origin"] == {"channel": "web"}
    assert out["meta"] == {"debug": 1}
    assert out["order_id"] == 7 and "id" not in out
    assert "never" not in out


def test_remove_skips_missing_fields_and_paths_through_non_objects() -> None:
    m = make(remove=["internal", "meta.debug", "absent", "region.sub"])
    out = doc_of(one(m, order()))
    assert "internal" not in out and out["meta"] == {"source": "web"} and out["region"] == "eu"


def test_root_replaces_the_document() -> None:
    out = one(make(root='{"id": data.id, "amount": data.price}'), order())
    assert doc_of(out) == {"id": 7, "amount": 2.5}


def test_root_then_rename_remove_set_work_on_the_new_document() -> None:
    m = make(root='{"id": data.id, "amount": data.price, "tmp": 1}',
             rename={"id": "order_id"}, remove=["tmp"], set={"id_was": "data.id"})
    assert doc_of(one(m, order())) == {"order_id": 7, "amount": 2.5, "id_was": 7}


def test_root_giving_a_list_or_a_scalar_writes_that_json() -> None:
    assert doc_of(one(make(root="[data.id, data.region]"), order())) == [7, "eu"]
    assert one(make(root="data.region"), order()).data == b'"eu"'


def test_root_giving_bytes_is_the_payload_as_it_is() -> None:
    assert one(make(root='b"raw bytes"'), order()).data == b"raw bytes"


def test_root_not_giving_an_object_fails_set() -> None:
    reason = rejected(make(root="[1]", set={"a": "1"}), order())
    assert reason == "mapping: root gave an array; set, rename and remove need a JSON object"


def test_a_constant_root_is_copied_before_it_is_edited() -> None:
    m = make(root='{"fixed": 1}', set={"id": "data.id"})
    first, second = run(m, order({"id": 1}), order({"id": 2}))
    assert doc_of(first) == {"fixed": 1, "id": 1}
    assert doc_of(second) == {"fixed": 1, "id": 2}
    assert doc_of(one(m, order({"id": 3}))) == {"fixed": 1, "id": 3}


def test_a_per_subject_root_is_copied_before_it_is_edited() -> None:
    m = make(root='{"region": tokens[1]}', set={"id": "data.id"})
    a, b = run(m, order({"id": 1}), order({"id": 2}))
    assert doc_of(a) == {"region": "eu", "id": 1}
    assert doc_of(b) == {"region": "eu", "id": 2}


# ------------------------------------------------------------ values as JSON


def test_cel_values_are_written_as_json_sensibly() -> None:
    m = make(set={
        "raw": 'b"\\x01\\x02hi"', "at": "timestamp", "parsed": 'timestamp("2024-05-01T10:00:00Z")',
        "wait": 'duration("90s")', "short": 'duration("1.5s")', "neg": 'duration("-2s")',
        "u": "uint(3)", "f": "1.5", "n": "null", "list": "[1, 'a', true]",
        "by_int": '{1: "one", 2: "two"}',
    })
    out = doc_of(one(m, order({}, timestamp=1714557600.25)))
    assert out == {
        "raw": "AQJoaQ==", "at": "2024-05-01T10:00:00.250000Z", "parsed": "2024-05-01T10:00:00Z",
        "wait": "90s", "short": "1.5s", "neg": "-2s", "u": 3, "f": 1.5, "n": None,
        "list": [1, "a", True], "by_int": {"1": "one", "2": "two"},
    }
    datetime.datetime.fromisoformat(out["at"])  # RFC 3339


def test_json_is_written_compactly_once() -> None:
    out = one(make(set={"x": "1"}), order({"a": [1, 2], "b": {"c": "d"}}))
    assert out.data == b'{"a":[1,2],"b":{"c":"d"},"x":1}'


def test_a_mapping_of_headers_subject_and_key_leaves_the_payload_bytes_alone() -> None:
    source = Message(b'{ "spaced" :  1 }', "a.b")
    out = one(make(headers={"X": '"y"'}, subject='"c.d"'), source)
    assert out.data is source.data
    binary = Message(b"\x00\xffnot json", "a.b")
    assert one(make(subject="subject + '.x'"), binary).data is binary.data


# ------------------------------------------------------ headers, subject, key


def test_headers_are_removed_then_set() -> None:
    m = make(remove_headers=["Drop", "X-Old", "Absent"],
             headers={"X-Old": 'headers["X-Old"] + "!"', "X-Id": "id"})
    source = order(headers={"Drop": "1", "Keep": "2", "X-Old": "v"})
    out = one(m, source)
    assert out.headers == {"Keep": "2", "X-Old": "v!", "X-Id": "ORDERS:1"}
    assert source.headers == {"Drop": "1", "Keep": "2", "X-Old": "v"}, "the input is unchanged"


def test_a_header_expression_giving_a_non_string_is_rejected() -> None:
    reason = rejected(make(headers={"X-Qty": "data.qty"}), order())
    assert reason == ("mapping: headers.X-Qty: expected a string, the expression gave a number; "
                      "convert it with string()")


def test_subject_giving_an_empty_or_non_string_value_is_rejected() -> None:
    assert "subject: expected a non-empty string" in rejected(make(subject="data.id"), order())
    assert "subject: expected a non-empty string" in rejected(make(subject='""'), order())


def test_key_from_bytes_string_or_null() -> None:
    assert one(make(key="bytes(data.region)"), order()).key == b"eu"
    assert one(make(key="data.region"), order()).key == b"eu"
    assert one(make(key="data.n"), order({"n": None}, key=b"old")).key is None
    reason = rejected(make(key="data.qty"), order())
    assert reason == "mapping: key: expected bytes or a string, the expression gave a number"


# ---------------------------------------------------------------- failures


def test_payload_not_json_is_rejected_when_fields_are_changed() -> None:
    reason = rejected(make(set={"a": "1"}), Message(b"\x00binary"))
    assert reason == "mapping: data is not JSON (set, rename and remove need a JSON object)"


def test_payload_json_but_not_an_object_is_rejected_when_fields_are_changed() -> None:
    reason = rejected(make(remove=["a"]), Message(b"[1, 2]"))
    assert reason == "mapping: data is an array; set, rename and remove need a JSON object"


def test_a_failing_expression_is_named_in_the_reason() -> None:
    m = make(set={"a": "data.price * 2.0", "b": "data.missing + 1", "c": "data.id"})
    reason = rejected(m, order())
    assert reason.startswith("mapping: set.b: expression 'data.missing + 1' failed")
    assert "missing" in reason


def test_a_failing_subject_only_expression_is_named_in_the_reason() -> None:
    reason = rejected(make(set={"t": "tokens[5]"}), order())
    assert reason.startswith("mapping: set.t: expression 'tokens[5]' failed")


def test_an_expression_reading_data_of_a_binary_payload_says_it_is_not_json() -> None:
    reason = rejected(make(subject="data.region"), Message(b"\x00\x01", "a"))
    assert "the payload is not JSON" in reason


def test_the_rest_of_a_batch_flows_past_a_failing_message() -> None:
    m = make(set={"double": "data.n * 2"})
    out = run(m, order({"n": 1}), order({"n": "x"}), order({"n": 3}))
    assert [type(o).__name__ for o in out] == ["Message", "Rejected", "Message"]
    assert [doc_of(o)["double"] for o in out if isinstance(o, Message)] == [2, 6]


# ------------------------------------------------------------ config errors


@pytest.mark.parametrize(("options", "expected"), [
    ({}, "a mapping needs at least one of"),
    ({"set": {"a": "data."}}, "Syntax error"),
    ({"set": {"a": "nope"}}, "undeclared reference to 'nope'"),
    ({"set": {"a..b": "1"}}, "expected a field path"),
    ({"remove": [".a"]}, "expected a field path"),
    ({"rename": {"a": ""}}, "expected a field path"),
    ({"set": {"a": "1", "a.b": "2"}}, "'a' and 'a.b' overlap"),
    ({"headers": {"X": "1"}}, "expected an expression giving a string, found one giving int"),
    ({"headers": {"X": 5}}, "expected a CEL expression written as a string, found int"),
    ({"subject": "size(subject)"}, "expected an expression giving a string"),
    ({"key": "1 + 1"}, "expected an expression giving bytes or a string, found one giving int"),
    ({"key": "1 +"}, "Syntax error"),
    ({"sett": {"a": "1"}}, "Extra inputs are not permitted"),
])
def test_config_errors(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        Mapping.make_test_instance(**options)


def test_set_paths_that_only_share_a_prefix_of_characters_do_not_overlap() -> None:
    m = make(set={"a": "1", "ab.c": "2"})
    assert doc_of(one(m, order({}))) == {"a": 1, "ab": {"c": 2}}


# ------------------------------------------------------------ evaluation plan


def test_expressions_on_data_are_evaluated_in_one_cel_call() -> None:
    m = make(set={"a": "data.id", "b": "data.qty * 2", "c": "data.region + '!'",
                  "d": "data.price", "e": "string(data.cid)"}, subject="subject + data.region",
             headers={"X-Id": "string(data.id)"})
    assert m.cel_calls == 1
    out = one(m, order())
    doc = doc_of(out)
    assert (doc["a"], doc["b"], doc["c"], doc["d"], doc["e"]) == (7, 8, "eu!", 2.5, "42")
    assert (out.subject, out.headers["X-Id"]) == ("orders.eu.neweu", "7")


def test_constants_cost_no_cel_call_and_subject_ones_one_memoized_each() -> None:
    m = make(set={"k": '"constant"', "t": "tokens[0]"}, headers={"X": '"h"'})
    assert m.cel_calls == 1  # tokens[0]; both constants were evaluated at load
    out = one(m, order())
    assert doc_of(out)["k"] == "constant" and doc_of(out)["t"] == "orders"
    assert out.headers["X"] == "h"


def test_expressions_ending_in_comments_combine() -> None:
    m = make(set={"a": "data.id // the id", "b": "data.qty // the quantity"})
    assert m.cel_calls == 1
    assert doc_of(one(m, order()))["b"] == 4


# ------------------------------------------------------------ through the engine


async def test_a_failing_mapping_dead_letters_only_the_bad_message_with_the_reason() -> None:
    pipe = make_pipeline(
        transforms=[{"type": "mapping", "set": {"total": "data.price * double(data.qty)"}}],
        dead_letter={"type": "fake"}, batch={"max_messages": 10, "max_wait": "1ms"})
    source, sink = parts(pipe)
    good = order(id="id-0")
    bad = order({"price": "free", "qty": 1}, id="id-1")
    also_good = order({"price": 1.0, "qty": 2}, id="id-2")
    ack = source.feed([good, bad, also_good])
    await finish(pipe)
    assert [m.id for m in sink.written] == ["id-0", "id-2"]
    assert [doc_of(m)["total"] for m in sink.written] == [10.0, 2.0]
    (letter,) = dlq(pipe).written
    assert letter.id == "id-1" and letter.data == bad.data, "the dead letter is the original"
    assert letter.headers["Natsconn-Error"].startswith(
        "mapping: set.total: expression 'data.price * double(data.qty)' failed")
    assert letter.headers["Natsconn-Error-Kind"] == "rejected"
    assert ack.settlements == [("ack", None)]
