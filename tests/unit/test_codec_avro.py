"""Avro: JSON → Avro → JSON field by field, the logical types' JSON forms, and
every way a payload or a JSON value can fail to fit the schema."""

from __future__ import annotations

import base64
import io
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from natsconn_codec import wire
from natsconn_codec.codecs import AvroCodec, load_avro_schema
from natsconn_codec.transforms import Decode, Encode

from connector import Message, Rejected, RejectedError

from ._codec_helpers import ORDER_AVSC, ORDER_JSON, PLAIN_AVSC, PLAIN_JSON, write_avsc


@pytest.fixture
def avsc(tmp_path: Path) -> str:
    return write_avsc(tmp_path)


def pair(path: str, **options: Any) -> tuple[Encode, Decode]:
    return (Encode.make_test_instance(format="avro", schema_file=path, **options),
            Decode.make_test_instance(format="avro", schema_file=path))


def one(result: Any) -> Message | Rejected:
    assert isinstance(result, list), "without a registry, process answers at once"
    assert len(result) == 1
    item: Message | Rejected = result[0]
    return item


def encoded(encode: Encode, value: Any, subject: str = "orders") -> bytes:
    out = one(encode.process([Message(orjson.dumps(value), subject)]))
    assert isinstance(out, Message), out
    return out.data


def test_ten_fields_round_trip_field_by_field(avsc: str) -> None:
    encode, decode = pair(avsc)
    data = encoded(encode, ORDER_JSON)
    back = one(decode.process([Message(data, "orders", b"k", {"H": "v"}, 1.5, "id-1")]))
    assert isinstance(back, Message)
    assert (back.subject, back.key, back.headers, back.timestamp, back.id) == (
        "orders", b"k", {"H": "v"}, 1.5, "id-1")
    value = json.loads(back.data.decode("utf-8"))  # UTF-8 JSON, as expressions see it
    assert list(value) == list(ORDER_JSON)
    for name, expected in ORDER_JSON.items():
        assert value[name] == expected, name


def test_the_avro_bytes_are_what_fastavro_writes_for_the_typed_values(avsc: str) -> None:
    """The JSON forms map onto the Avro values they name, not merely onto themselves."""
    from datetime import UTC, date, datetime

    encode, _ = pair(avsc)
    typed = dict(ORDER_JSON, amount=Decimal("1234.50"),
                 created=datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC),
                 day=date(2024, 5, 1), token=b"\x00\x01\x02\xff")
    schema, _ = load_avro_schema(avsc)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, typed)
    assert encoded(encode, ORDER_JSON) == out.getvalue()


def test_encode_takes_the_raw_numbers_avro_stores(avsc: str) -> None:
    encode, _ = pair(avsc)
    raw = dict(ORDER_JSON, amount=1234.5, created=1714564800123, day=19844)
    assert encoded(encode, raw) == encoded(encode, ORDER_JSON)


@pytest.mark.parametrize(("logical", "value", "json_value"), [
    ({"type": "long", "logicalType": "timestamp-micros"}, "2024-05-01T12:00:00.123456Z",
     "2024-05-01T12:00:00.123456Z"),
    ({"type": "long", "logicalType": "timestamp-millis"}, "2024-05-01T14:00:00+02:00",
     "2024-05-01T12:00:00.000Z"),
    ({"type": "long", "logicalType": "local-timestamp-millis"}, "2024-05-01T12:00:00.500",
     "2024-05-01T12:00:00.500"),
    ({"type": "int", "logicalType": "time-millis"}, "12:34:56.789", "12:34:56.789"),
    ({"type": "long", "logicalType": "time-micros"}, "12:34:56.000001", "12:34:56.000001"),
    ({"type": "string", "logicalType": "uuid"}, "5f0c7c1e-3b7a-4c1e-9a61-0e7d0c3b9a10",
     "5f0c7c1e-3b7a-4c1e-9a61-0e7d0c3b9a10"),
    ({"type": "fixed", "name": "Money", "size": 8, "logicalType": "decimal", "precision": 12,
      "scale": 4}, "-0.0001", "-0.0001"),
    ({"type": "bytes", "logicalType": "decimal", "precision": 30, "scale": 9},
     "0.000000001", "0.000000001"),
    ({"type": "fixed", "name": "Hash", "size": 4}, "3q2+7w==", "3q2+7w=="),
    ({"type": "enum", "name": "Color", "symbols": ["RED", "GREEN"]}, "GREEN", "GREEN"),
    ({"type": "array", "items": "bytes"}, ["AQ==", "Ag=="], ["AQ==", "Ag=="]),
    ({"type": "map", "values": {"type": "int", "logicalType": "date"}}, {"a": "2000-01-01"},
     {"a": "2000-01-01"}),
    (["null", {"type": "long", "logicalType": "timestamp-millis"}], "1970-01-01T00:00:01.000Z",
     "1970-01-01T00:00:01.000Z"),
    (["null", "string", "bytes"], "stays a string", "stays a string"),
])
def test_logical_and_binary_types_map_to_json(tmp_path: Path, logical: Any, value: Any,
                                              json_value: Any) -> None:
    schema = {"type": "record", "name": "T", "fields": [{"name": "v", "type": logical}]}
    path = write_avsc(tmp_path, schema)
    encode, decode = pair(path)
    back = one(decode.process([Message(encoded(encode, {"v": value}))]))
    assert isinstance(back, Message), back
    assert orjson.loads(back.data) == {"v": json_value}


def test_nested_records_arrays_and_recursive_types(tmp_path: Path) -> None:
    schema = {
        "type": "record", "name": "Node", "namespace": "t",
        "fields": [
            {"name": "blob", "type": "bytes"},
            {"name": "children", "type": {"type": "array", "items": "t.Node"}},
            {"name": "meta", "type": ["null", {"type": "record", "name": "Meta", "fields": [
                {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}]},
        ],
    }
    path = write_avsc(tmp_path, schema)
    encode, decode = pair(path)
    value = {"blob": "AA==", "meta": None, "children": [
        {"blob": "AQ==", "children": [], "meta": {"at": "2020-01-01T00:00:00.000Z"}}]}
    back = one(decode.process([Message(encoded(encode, value))]))
    assert isinstance(back, Message)
    assert orjson.loads(back.data) == value


# ------------------------------------------------------------------ rejections


@pytest.mark.parametrize(("change", "reason"), [
    ({"qty": "three"}, r"qty.*expected int"),
    ({"customer": None}, r"customer.*expected string"),
    ({"amount": "12.345"}, r"field shop\.Order\.amount: expected at most 2 decimal place"),
    ({"amount": 123456789}, r"field shop\.Order\.amount: expected at most 8 digit\(s\)"),
    ({"amount": "lots"}, r"field shop\.Order\.amount: expected a decimal number"),
    ({"created": "yesterday"}, r"field shop\.Order\.created: expected an RFC 3339 timestamp"),
    ({"day": "2024-13-01"}, r"field shop\.Order\.day: expected an ISO 8601 date"),
    ({"token": "not base64!"}, r"field shop\.Order\.token: expected base64 text"),
    ({"id": 2**62 * 1.5}, r"shop\.Order\.id.*expected long"),
    ({"paid": "yes"}, r"shop\.Order\.paid.*expected boolean"),
])
def test_a_json_value_that_does_not_fit_is_rejected_naming_the_field(
        avsc: str, change: dict[str, Any], reason: str) -> None:
    encode, _ = pair(avsc)
    out = one(encode.process([Message(orjson.dumps(dict(ORDER_JSON, **change)))]))
    assert isinstance(out, Rejected)
    assert out.reason.startswith("JSON does not fit Avro schema shop.Order: "), out.reason
    assert re.search(reason, out.reason), out.reason


def test_a_missing_field_is_rejected_and_one_with_a_default_is_filled(avsc: str) -> None:
    encode, decode = pair(avsc)
    missing = {k: v for k, v in ORDER_JSON.items() if k != "qty"}
    out = one(encode.process([Message(orjson.dumps(missing))]))
    assert isinstance(out, Rejected)
    assert "qty" in out.reason, out.reason
    without_note = {k: v for k, v in ORDER_JSON.items() if k != "note"}
    back = one(decode.process([Message(encoded(encode, without_note))]))
    assert isinstance(back, Message)
    assert orjson.loads(back.data)["note"] is None


def test_extra_fields_are_left_out_or_rejected(avsc: str) -> None:
    extra = dict(ORDER_JSON, unknown=1)
    lenient, decode = pair(avsc)
    back = one(decode.process([Message(encoded(lenient, extra))]))
    assert isinstance(back, Message)
    assert "unknown" not in orjson.loads(back.data)
    strict = Encode.make_test_instance(format="avro", schema_file=avsc, extra_fields="reject")
    out = one(strict.process([Message(orjson.dumps(extra))]))
    assert isinstance(out, Rejected)
    assert "more fields than the schema" in out.reason and "unknown" in out.reason


def test_data_that_is_not_json_is_rejected(avsc: str) -> None:
    encode, _ = pair(avsc)
    out = one(encode.process([Message(b"\x00\x01 not json")]))
    assert isinstance(out, Rejected) and out.reason.startswith("data is not JSON")


def test_a_payload_that_does_not_fit_the_schema_is_rejected(avsc: str) -> None:
    encode, decode = pair(avsc)
    good = encoded(encode, ORDER_JSON)
    truncated = one(decode.process([Message(good[:10])]))
    assert isinstance(truncated, Rejected)
    assert truncated.reason.startswith("payload does not fit Avro schema shop.Order")
    trailing = one(decode.process([Message(good + b"\x00\x00")]))
    assert isinstance(trailing, Rejected)
    assert "2 byte(s) left after the record" in trailing.reason
    garbage = one(decode.process([Message(b"\xff" * 40)]))
    assert isinstance(garbage, Rejected)
    assert garbage.reason.startswith("payload does not fit Avro schema shop.Order")


def test_one_bad_message_does_not_stop_the_batch(avsc: str) -> None:
    encode, decode = pair(avsc)
    good = encoded(encode, ORDER_JSON)
    out = decode.process([Message(good, id="1"), Message(b"\x01", id="2"),
                          Message(good, id="3")])
    assert isinstance(out, list)
    assert [type(x).__name__ for x in out] == ["Message", "Rejected", "Message"]
    assert [x.id if isinstance(x, Message) else x.message.id for x in out] == ["1", "2", "3"]


def test_confluent_framing_without_a_registry(avsc: str) -> None:
    """decode with wire_format confluent and a local schema checks and skips the header."""
    encode, _ = pair(avsc)
    body = encoded(encode, ORDER_JSON)
    decode = Decode.make_test_instance(format="avro", schema_file=avsc, wire_format="confluent")
    back = one(decode.process([Message(wire.header(42) + body)]))
    assert isinstance(back, Message) and orjson.loads(back.data) == ORDER_JSON
    for bad, reason in [(body, "bad magic byte"), (b"\x00\x00", "shorter than the Confluent")]:
        out = one(decode.process([Message(bad)]))
        assert isinstance(out, Rejected) and reason in out.reason, out


def test_codec_writes_its_prefix_first(tmp_path: Path) -> None:
    schema, _ = load_avro_schema(write_avsc(tmp_path, PLAIN_AVSC))
    codec = AvroCodec(schema)
    body = codec.from_json(orjson.dumps(PLAIN_JSON))
    assert codec.from_json(orjson.dumps(PLAIN_JSON), wire.header(9)) == wire.header(9) + body
    assert orjson.loads(codec.to_json(wire.header(9) + body, 5)) == PLAIN_JSON


def test_reader_schema_resolution(tmp_path: Path) -> None:
    """decode with a writer schema and a reader schema (registry + schema_file) resolves."""
    writer, _ = load_avro_schema(write_avsc(tmp_path, PLAIN_AVSC))
    reader_schema = dict(PLAIN_AVSC, fields=[*PLAIN_AVSC["fields"][:2],
                                              {"name": "added", "type": "string",
                                               "default": "x"}])
    reader, _ = load_avro_schema(write_avsc(tmp_path, reader_schema, "reader.avsc"))
    body = AvroCodec(writer).from_json(orjson.dumps(PLAIN_JSON))
    value = orjson.loads(AvroCodec(writer, reader=reader).to_json(body))
    assert value == {"id": 1234567, "customer": "c-42", "added": "x"}


def test_rejected_error_text_is_the_reason(avsc: str) -> None:
    schema, _ = load_avro_schema(avsc)
    with pytest.raises(RejectedError, match=r"payload does not fit Avro schema shop\.Order"):
        AvroCodec(schema).to_json(b"")


# ------------------------------------------------------------------ the fast writer

WIDE_AVSC: dict[str, Any] = {
    "type": "record", "name": "Wide", "namespace": "w",
    "fields": [
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "s", "type": "string"},
        {"name": "raw", "type": "bytes"},
        {"name": "n", "type": "null"},
        {"name": "color", "type": {"type": "enum", "name": "Color",
                                   "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "opt", "type": ["null", "string"]},
        {"name": "num", "type": ["null", "long", "double"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "attrs", "type": {"type": "map", "values": ["null", "w.Color", "long"]}},
        {"name": "child", "type": ["null", {"type": "record", "name": "Child", "fields": [
            {"name": "name", "type": "string"},
            {"name": "next", "type": ["null", "w.Child"], "default": None}]}]},
        {"name": "kids", "type": {"type": "array", "items": "w.Child"}},
        {"name": "dflt", "type": "string", "default": "x"},
        {"name": "dnum", "type": ["long", "null"], "default": 7},
        {"name": "nodefault_nullable", "type": ["null", "int"]},
    ],
}


def random_wide(rng: Any) -> dict[str, Any]:
    def text() -> str:
        return "".join(rng.choice("aé€𝄞z ") for _ in range(rng.choice([0, 1, 5, 70, 200])))

    def child(depth: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {"name": text()}
        if rng.random() < 0.5:
            out["next"] = child(depth + 1) if depth < 3 and rng.random() < 0.5 else None
        return out

    value: dict[str, Any] = {
        "b": rng.random() < 0.5,
        "i": rng.choice([0, 1, -1, 63, 64, -65, 2**31 - 1, -(2**31), rng.randint(-9999, 9999)]),
        "l": rng.choice([0, 2**63 - 1, -(2**63), 1_764_000_000_123, 8191, 8192, -8193,
                         2**21, 2**35 + 3]),
        "f": rng.choice([0.0, 1.5, -2.25, 3]),
        "d": rng.choice([0.0, 1e300, -1.5, 12.34, 7]),
        "s": text(),
        "raw": base64.b64encode(bytes(rng.randrange(256) for _ in range(rng.choice([0, 3,
                                                                                    90])))
                                ).decode(),
        "n": None,
        "color": rng.choice(["RED", "GREEN", "BLUE"]),
        "opt": rng.choice([None, text()]),
        "num": rng.choice([None, 5, -(2**40), 2.5]),
        "tags": [text() for _ in range(rng.choice([0, 1, 3]))],
        "attrs": {text(): rng.choice([None, "RED", 42]) for _ in range(rng.choice([0, 2]))},
        "child": rng.choice([None, child()]),
        "kids": [child() for _ in range(rng.choice([0, 2]))],
    }
    if rng.random() < 0.5:
        value["dflt"] = text()
    if rng.random() < 0.5:
        value["dnum"] = rng.choice([None, 3])
    if rng.random() < 0.5:
        value["nodefault_nullable"] = rng.choice([None, 9])
    if rng.random() < 0.3:
        value["not_in_schema"] = 1
    return value


def test_the_fast_writer_writes_fastavros_bytes(tmp_path: Path) -> None:
    import random

    schema, _ = load_avro_schema(write_avsc(tmp_path, WIDE_AVSC))
    codec = AvroCodec(schema)
    assert codec._write is not None, "this schema is within the fast writer's reach"
    rng = random.Random(7)
    for _ in range(500):
        value = random_wide(rng)
        fast = codec.from_json(orjson.dumps(value))
        typed = dict(value, raw=base64.b64decode(value["raw"]))
        reference = io.BytesIO()
        fastavro.schemaless_writer(reference, schema, typed)
        assert fast == reference.getvalue(), value
        back = orjson.loads(codec.to_json(fast))
        expected = {**{"dflt": "x", "dnum": 7, "nodefault_nullable": None}, **value}
        expected.pop("not_in_schema", None)
        assert back == with_next(expected)


def with_next(value: Any) -> Any:
    """What decode gives: every Child with its ``next`` (default null)."""
    if isinstance(value, list):
        return [with_next(v) for v in value]
    if isinstance(value, dict):
        out = {k: with_next(v) for k, v in value.items()}
        if set(out) <= {"name", "next"} and "name" in out:
            out.setdefault("next", None)
        return out
    return value


def test_the_fast_writer_covers_plain_records_and_not_the_rest(tmp_path: Path) -> None:
    bench_schema = Path(__file__).resolve().parents[2] / "bench" / "schemas" / "order.avsc"
    cases = [(PLAIN_AVSC, True), (ORDER_AVSC, True),
             ({"type": "record", "name": "X", "fields": [{"name": "m", "type": {
                 "type": "fixed", "name": "M", "size": 8, "logicalType": "decimal",
                 "precision": 12, "scale": 2}}]}, False),  # fixed: fastavro
             ({"type": "record", "name": "U", "fields": [
                 {"name": "u", "type": ["int", "long"]}]}, False),  # two integer branches
             ({"type": "record", "name": "F", "fields": [
                 {"name": "h", "type": {"type": "fixed", "name": "H", "size": 2}}]}, False)]
    if bench_schema.exists():
        cases.append((json.loads(bench_schema.read_text()), True))
    for i, (raw, fast) in enumerate(cases):
        schema, _ = load_avro_schema(write_avsc(tmp_path, raw, f"s{i}.avsc"))
        assert (AvroCodec(schema)._write is not None) is fast, raw["name"]
    schema, _ = load_avro_schema(write_avsc(tmp_path, PLAIN_AVSC, "p.avsc"))
    assert AvroCodec(schema, reject_extra=True)._write is None


@pytest.mark.parametrize(("change", "reason"), [
    ({"b": 1}, "field w.Wide.b: expected boolean, found 1 (int)"),
    ({"b": None}, "field w.Wide.b: expected boolean, found None (NoneType)"),
    ({"i": 1.0}, "field w.Wide.i: expected int, found 1.0 (float)"),
    ({"i": True}, "field w.Wide.i: expected int, found True (bool)"),
    ({"i": 2**31}, "field w.Wide.i: expected int, found 2147483648 (int)"),
    ({"l": "5"}, "field w.Wide.l: expected long, found '5' (str)"),
    ({"f": 1e39}, "field w.Wide.f: expected a float in range, found 1e+39 (float)"),
    ({"d": "1.5"}, "field w.Wide.d: expected double, found '1.5' (str)"),
    ({"s": 5}, "field w.Wide.s: expected string, found 5 (int)"),
    ({"raw": "!!"}, "field w.Wide.raw: expected base64 text, found '!!' (str)"),
    ({"n": 0}, "field w.Wide.n: expected null, found 0 (int)"),
    ({"color": "PINK"}, "field w.Wide.color: expected one of the symbols RED, GREEN, BLUE"),
    ({"opt": 5}, "field w.Wide.opt: expected one of the union's types (null, string), found 5"),
    ({"tags": "a"}, "field w.Wide.tags: expected array, found 'a' (str)"),
    ({"tags": ["a", 1]}, "field w.Wide.tags[]: expected string, found 1 (int)"),
    ({"attrs": {"k": "PINK"}}, "field w.Wide.attrs{}: expected one of the symbols"),
    ({"child": {"next": None}}, "field w.Wide.child.name: no value and no default"),
    # a recursive type is one writer: the path is where the recursion starts
    ({"kids": [{"name": "a", "next": {"name": 3}}]},
     "field w.Wide.kids[].name: expected string, found 3 (int)"),
])
def test_the_fast_writer_refuses_what_does_not_fit_naming_the_field(
        tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    import random

    schema, _ = load_avro_schema(write_avsc(tmp_path, WIDE_AVSC))
    value = dict(random_wide(random.Random(1)), **change)
    with pytest.raises(RejectedError) as info:
        AvroCodec(schema).from_json(orjson.dumps(value))
    assert str(info.value).startswith("JSON does not fit Avro schema w.Wide: "), info.value
    assert reason in str(info.value), info.value


def test_a_missing_field_without_default_is_refused_by_the_fast_writer(tmp_path: Path) -> None:
    schema, _ = load_avro_schema(write_avsc(tmp_path, PLAIN_AVSC))
    missing = {k: v for k, v in PLAIN_JSON.items() if k != "qty"}
    with pytest.raises(RejectedError, match=r"field bench\.Plain\.qty: no value and no default"):
        AvroCodec(schema).from_json(orjson.dumps(missing))
    # a nullable field without a default is written as null, as fastavro does
    no_note = {k: v for k, v in PLAIN_JSON.items() if k != "note"}
    codec = AvroCodec(schema)
    assert orjson.loads(codec.to_json(codec.from_json(orjson.dumps(no_note))))["note"] is None


LOGICAL_AVSC: dict[str, Any] = {
    "type": "record", "name": "Times", "namespace": "lt",
    "fields": [
        {"name": "ts_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ts_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "local_ms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "local_us", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "t_ms", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "t_us", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "money", "type": {"type": "bytes", "logicalType": "decimal", "precision": 20,
                                   "scale": 2}},
        {"name": "rate", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9,
                                  "scale": 6}},
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "maybe_ts", "type": ["null", {"type": "long",
                                               "logicalType": "timestamp-millis"}]},
        {"name": "maybe_money", "type": ["null", {"type": "bytes", "logicalType": "decimal",
                                                  "precision": 10, "scale": 2}]},
    ],
}


def random_times(rng: Any) -> dict[str, Any]:
    def stamp(micros: bool, zone: bool) -> Any:
        if rng.random() < 0.2:
            return rng.randrange(-(10**12), 10**13)  # the number Avro stores
        year = rng.choice([1969, 1970, 2024, 2999, 1900])
        frac = f".{rng.randrange(10**6):06d}" if micros else f".{rng.randrange(1000):03d}"
        tz = rng.choice(["Z", "+02:00", "-05:30"]) if zone else ""
        return f"{year}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T" \
               f"{rng.randint(10, 23)}:{rng.randint(10, 59)}:{rng.randint(10, 59)}{frac}{tz}"

    def money(places: int) -> Any:
        n = rng.randrange(-(10**9), 10**9)
        text = f"{n / 10**places:.{rng.randint(0, places)}f}"
        return rng.choice([text, int(n // 10**places)])

    return {
        "ts_ms": stamp(False, True), "ts_us": stamp(True, True),
        "local_ms": stamp(False, False), "local_us": stamp(True, False),
        "day": rng.choice(["1969-12-31", "2024-02-29", "0001-01-01", rng.randint(-999, 99999)]),
        "t_ms": rng.choice(["00:00:00.000", "23:59:59.999", rng.randrange(86_400_000)]),
        "t_us": rng.choice(["12:34:56.123456", rng.randrange(86_400_000_000)]),
        "money": money(2), "rate": rng.choice(["0.000001", "-0.5", "999.999999", 0]),
        "id": "5f0c7c1e-3b7a-4c1e-9a61-0e7d0c3b9a10",
        "maybe_ts": rng.choice([None, stamp(False, True)]),
        "maybe_money": rng.choice([None, money(2)]),
    }


def test_the_fast_writer_writes_logical_types_as_fastavro(tmp_path: Path) -> None:
    import copy
    import random

    schema, _ = load_avro_schema(write_avsc(tmp_path, LOGICAL_AVSC))
    codec = AvroCodec(schema)
    assert codec._write is not None and codec._convert is not None
    rng = random.Random(11)
    for _ in range(500):
        value = random_times(rng)
        fast = codec.from_json(orjson.dumps(value))
        typed = codec._convert(copy.deepcopy(value))  # what fastavro is given otherwise
        reference = io.BytesIO()
        fastavro.schemaless_writer(reference, schema, typed)
        assert fast == reference.getvalue(), value
