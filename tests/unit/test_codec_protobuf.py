"""Protobuf from a descriptor set: nested, repeated, map, enum, int64 and bytes
round trips, the message-index path, and the payloads and JSON that do not fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from natsconn_codec import wire
from natsconn_codec.codecs import ProtobufCodec, load_descriptors
from natsconn_codec.transforms import Decode, Encode

from connector import Message, Rejected

from ._codec_helpers import PROTO_ORDER_JSON, write_descriptor_set


@pytest.fixture
def pb(tmp_path: Path) -> str:
    return write_descriptor_set(tmp_path)


def pair(path: str, message: str = "shop.v1.Order", **options: Any) -> tuple[Encode, Decode]:
    decode_options = {k: v for k, v in options.items() if k != "extra_fields"}
    return (Encode.make_test_instance(format="protobuf", schema_file=path, message=message,
                                      **options),
            Decode.make_test_instance(format="protobuf", schema_file=path, message=message,
                                      **decode_options))


def one(result: Any) -> Message | Rejected:
    assert isinstance(result, list) and len(result) == 1
    item: Message | Rejected = result[0]
    return item


def encoded(encode: Encode, value: Any) -> bytes:
    out = one(encode.process([Message(orjson.dumps(value), "orders")]))
    assert isinstance(out, Message), out
    return out.data


def test_nested_repeated_map_enum_int64_bytes_round_trip(pb: str) -> None:
    encode, decode = pair(pb)
    back = one(decode.process([Message(encoded(encode, PROTO_ORDER_JSON), "orders")]))
    assert isinstance(back, Message)
    value = orjson.loads(back.data)
    for name, expected in PROTO_ORDER_JSON.items():
        assert value[name] == expected, name


def test_the_bytes_are_the_protobuf_encoding(pb: str) -> None:
    encode, _ = pair(pb)
    codec = ProtobufCodec(load_descriptors(pb), "shop.v1.Order")
    message = codec.cls()
    message.id = 9007199254740993  # type: ignore[attr-defined]
    message.token = b"\x00\x01\x02\xff"  # type: ignore[attr-defined]
    message.items.add(sku="A-1", count=2)  # type: ignore[attr-defined]
    parsed = codec.cls.FromString(encoded(encode, {"id": 9007199254740993, "token": "AAEC/w==",
                                                   "items": [{"sku": "A-1", "count": 2}]}))
    assert parsed == message


def test_int64_maps_to_a_json_string_and_encode_takes_both(pb: str) -> None:
    encode, decode = pair(pb)
    as_number = encoded(encode, {"id": 42})
    as_string = encoded(encode, {"id": "42"})
    assert as_number == as_string
    back = one(decode.process([Message(as_number)]))
    assert isinstance(back, Message)
    value = orjson.loads(back.data)
    assert value["id"] == "42"
    # fields at their default value are printed (a field-by-field round trip keeps them)
    assert value["qty"] == 0 and value["customer"] == "" and value["items"] == []
    assert value["status"] == "STATUS_UNSPECIFIED"
    assert "address" not in value  # an unset message field has presence: left out


def test_json_names_lower_camel_case(tmp_path: Path) -> None:
    from google.protobuf import descriptor_pb2

    f = descriptor_pb2.FileDescriptorProto(name="snake.proto", package="t", syntax="proto3")
    m = f.message_type.add(name="M")
    m.field.add(name="order_id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, json_name="orderId")
    fds = descriptor_pb2.FileDescriptorSet(file=[f])
    path = tmp_path / "snake.pb"
    path.write_bytes(fds.SerializeToString())
    encode, proto_names = pair(str(path), "t.M")
    camel = Decode.make_test_instance(format="protobuf", schema_file=str(path), message="t.M",
                                      json_names="json")
    data = encoded(encode, {"order_id": "a"})
    assert encoded(encode, {"orderId": "a"}) == data  # encode takes either name
    for decode, key in ((proto_names, "order_id"), (camel, "orderId")):
        back = one(decode.process([Message(data)]))
        assert isinstance(back, Message) and orjson.loads(back.data) == {key: "a"}


def test_confluent_message_indexes_pick_the_message(pb: str) -> None:
    """With wire_format confluent the index path in the header names the message type."""
    encode, _ = pair(pb, message="shop.v1.Item")
    item = encoded(encode, {"sku": "X", "count": "7"})
    order_encode, _ = pair(pb)
    order = encoded(order_encode, {"id": "1", "customer": "c"})
    address_codec = ProtobufCodec(load_descriptors(pb), "shop.v1.Order.Address")
    assert address_codec.indexes == [0, 0]
    address = address_codec.from_json(orjson.dumps({"city": "Lyon"}))
    decode = Decode.make_test_instance(format="protobuf", schema_file=pb, message="shop.v1.Order",
                                       wire_format="confluent")
    out = decode.process([
        Message(wire.header(3, [1]) + item),
        Message(wire.header(3, [0]) + order),
        Message(wire.header(3, [0, 0]) + address),
        Message(wire.header(3, [5]) + item),
        Message(wire.header(3) + b"\x04\x02"),
    ])
    assert isinstance(out, list)
    values = [orjson.loads(m.data) if isinstance(m, Message) else m.reason for m in out]
    assert values[0] == {"sku": "X", "count": "7"}
    assert values[1]["id"] == "1" and values[1]["customer"] == "c"
    assert values[2] == {"city": "Lyon", "zip": ""}
    assert values[3] == "message index path [5] names no message of 'shop/v1/order.proto'"
    assert "truncated Confluent header" in values[4]


def test_codec_index_path_and_registry_text(pb: str) -> None:
    import base64

    from google.protobuf import descriptor_pb2

    codec = ProtobufCodec(load_descriptors(pb), "shop.v1.Item")
    assert codec.indexes == [1]
    file = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(codec.schema_text()))
    assert file.name == "shop/v1/order.proto" and file.package == "shop.v1"
    assert codec.imports_beyond_well_known() == []


def test_well_known_imports_need_not_be_in_the_set(tmp_path: Path) -> None:
    path = write_descriptor_set(tmp_path, include_timestamp=False)
    encode, decode = pair(path)
    back = one(decode.process([Message(encoded(encode, PROTO_ORDER_JSON))]))
    assert isinstance(back, Message)
    assert orjson.loads(back.data)["created"] == "2024-05-01T12:00:00.123Z"


@pytest.mark.parametrize(("change", "reason"), [
    ({"qty": "three"}, r"qty"),
    ({"id": "12x"}, r"id"),
    ({"status": "SHIPPED"}, r"status.*SHIPPED"),
    ({"items": [{"sku": 5}]}, r"sku"),
    ({"items": {"sku": "A"}}, r"items"),
    ({"address": {"town": "Lyon"}}, r"town"),
    ({"token": 5}, r"token"),
    ({"created": "soon"}, r"created"),
])
def test_json_that_does_not_fit_is_rejected_naming_the_field(pb: str, change: dict[str, Any],
                                                             reason: str) -> None:
    import re

    encode, _ = pair(pb, extra_fields="reject")
    value = copy.deepcopy(PROTO_ORDER_JSON)
    value.update(change)
    out = one(encode.process([Message(orjson.dumps(value))]))
    assert isinstance(out, Rejected)
    assert out.reason.startswith("JSON does not fit Protobuf message shop.v1.Order: "), out.reason
    assert re.search(reason, out.reason), out.reason


def test_unknown_fields_are_ignored_by_default(pb: str) -> None:
    encode, _ = pair(pb)
    assert encoded(encode, {"id": 1, "nope": True}) == encoded(encode, {"id": 1})


def test_a_payload_that_is_not_the_message_is_rejected(pb: str) -> None:
    _, decode = pair(pb)
    out = one(decode.process([Message(b"\xff\xff\xff")]))
    assert isinstance(out, Rejected)
    assert out.reason.startswith("payload is not a valid shop.v1.Order: "), out.reason
    json_in = one(decode.process([Message(b'{"id": 1}')]))
    assert isinstance(json_in, Rejected)


def test_not_json_and_not_an_object(pb: str) -> None:
    encode, _ = pair(pb)
    out = encode.process([Message(b"nope"), Message(b"[1, 2]")])
    assert isinstance(out, list)
    assert all(isinstance(x, Rejected) for x in out)
    assert out[0].reason.startswith("data is not JSON")  # type: ignore[union-attr]
    assert out[1].reason.startswith("JSON does not fit Protobuf message")  # type: ignore[union-attr]


PARITY_CASES: list[dict[str, Any]] = [
    PROTO_ORDER_JSON,
    {},
    {"weight": 0.1, "email": "a@b.c", "slots": {"1": {"sku": "x", "count": "1"}, "-7": {}}},
    {"phone": "", "weight": "Infinity", "amount": "NaN", "status": 7},
    {"address": {}, "items": [{}], "created": "1970-01-01T00:00:00Z", "token": ""},
    {"id": "-9223372036854775808", "qty": -2147483648, "labels": {"": ""}},
    {"created": "2024-05-01T14:00:00.000001+02:00"},
    {"created": "1969-12-31T23:59:59.999999999Z"},  # nanoseconds: json_format parses
    {"created": "0001-01-01T00:00:00Z"},
]


@pytest.mark.parametrize("case", range(len(PARITY_CASES)))
def test_fast_paths_give_what_json_format_gives(pb: str, case: int) -> None:
    """decode and encode build messages and dicts from converters compiled per
    message type; json_format is the reference."""
    from google.protobuf import json_format

    value = PARITY_CASES[case]
    for proto_names in (True, False):
        codec = ProtobufCodec(load_descriptors(pb), "shop.v1.Order", proto_names=proto_names)
        reference = codec.cls()
        json_format.ParseDict(value, reference, descriptor_pool=codec.descriptors.pool)
        encoded = codec.from_json(orjson.dumps(value))
        assert codec.cls.FromString(encoded) == reference
        data = reference.SerializeToString()
        fast = orjson.loads(codec.to_json(data))
        slow = orjson.loads(codec.to_json_slow(data))
        assert fast == slow


def test_the_fast_encode_path_is_taken(pb: str) -> None:
    codec = ProtobufCodec(load_descriptors(pb), "shop.v1.Order")
    kwargs = codec._from_dict(orjson.loads(orjson.dumps(PROTO_ORDER_JSON)))
    assert kwargs["id"] == 9007199254740993 and kwargs["token"] == b"\x00\x01\x02\xff"
