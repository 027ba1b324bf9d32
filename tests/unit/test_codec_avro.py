"""Avro: JSON → Avro → JSON field by field, the logical types' JSON forms, and
every way a payload or a JSON value can fail to fit the schema."""

from __future__ import annotations

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

from ._codec_helpers import ORDER_JSON, PLAIN_AVSC, PLAIN_JSON, write_avsc


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
