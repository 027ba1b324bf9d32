"""MessagePack and JSON: round trips, the JSON forms of bin and timestamps, and rejections."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgpack
import orjson
import pytest
from natsconn_codec import wire
from natsconn_codec.transforms import Decode, Encode

from connector import Message, Rejected

from ._codec_helpers import ORDER_JSON


def run(transform: Encode | Decode, *payloads: bytes) -> list[Message | Rejected]:
    out = transform.process([Message(p, "s") for p in payloads])
    assert isinstance(out, list)
    return out


def test_msgpack_round_trips_json_field_by_field() -> None:
    encode = Encode.make_test_instance(format="msgpack")
    decode = Decode.make_test_instance(format="msgpack")
    value: dict[str, Any] = dict(ORDER_JSON, nested={"list": [1, 2.5, None, "x"], "t": True})
    [packed] = run(encode, orjson.dumps(value))
    assert isinstance(packed, Message)
    assert msgpack.unpackb(packed.data) == value
    [back] = run(decode, packed.data)
    assert isinstance(back, Message) and orjson.loads(back.data) == value


def test_msgpack_bin_timestamp_and_integer_keys_get_json_forms() -> None:
    decode = Decode.make_test_instance(format="msgpack")
    data = msgpack.packb({"b": b"\x00\xff", 7: "int key",
                          "at": datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)},
                         use_bin_type=True, datetime=True)
    [back] = run(decode, data)
    assert isinstance(back, Message)
    assert orjson.loads(back.data) == {"b": "AP8=", "7": "int key",
                                       "at": "2024-05-01T12:00:00.500Z"}


@pytest.mark.parametrize(("payload", "reason"), [
    (msgpack.packb(msgpack.ExtType(5, b"x")), "extension type 5 has no JSON form"),
    (b"\xc1", "payload is not MessagePack"),               # a reserved byte
    (msgpack.packb(1) + b"\x01", "payload is not MessagePack: ExtraData"),
    (b"\x92\x01", "payload is not MessagePack"),            # an array cut short
    (msgpack.packb({b"k": 1}, use_bin_type=True), "no JSON form"),  # bytes as a key
])
def test_msgpack_rejections(payload: bytes, reason: str) -> None:
    [out] = run(Decode.make_test_instance(format="msgpack"), payload)
    assert isinstance(out, Rejected)
    assert reason in out.reason, out.reason


def test_json_checks_and_passes_through() -> None:
    for transform in (Encode.make_test_instance(format="json"),
                      Decode.make_test_instance(format="json")):
        good, bad, not_utf8 = run(transform, b'{"a": 1}', b"{", b'"\xff"')
        assert isinstance(good, Message) and good.data == b'{"a": 1}'
        assert isinstance(bad, Rejected) and bad.reason.startswith("data is not JSON")
        assert isinstance(not_utf8, Rejected)


def test_json_decode_strips_a_confluent_header() -> None:
    decode = Decode.make_test_instance(format="json", wire_format="confluent")
    good, bad = run(decode, wire.header(4) + b'{"a": 1}', b'{"a": 1}')
    assert isinstance(good, Message) and good.data == b'{"a": 1}'
    assert isinstance(bad, Rejected) and "bad magic byte 0x7b" in bad.reason


async def test_without_a_registry_connect_and_close_do_nothing() -> None:
    transform = Encode.make_test_instance(format="msgpack")
    await transform.connect()
    [out] = run(transform, b"[1]")
    await transform.close()
    assert isinstance(out, Message) and out.data == b"\x91\x01"
