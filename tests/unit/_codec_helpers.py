"""Schemas and records shared by the codec tests (unit and integration).

The Protobuf descriptor set is built with descriptor_pb2, as protoc would
write it, so no protoc is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, timestamp_pb2

# A 10-field record with the logical types that need a JSON mapping.
ORDER_AVSC: dict[str, Any] = {
    "type": "record", "name": "Order", "namespace": "shop",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "customer", "type": "string"},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal",
                                    "precision": 10, "scale": 2}},
        {"name": "qty", "type": "int"},
        {"name": "paid", "type": "boolean"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "created", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "token", "type": "bytes"},
        {"name": "score", "type": "double"},
    ],
}

ORDER_JSON: dict[str, Any] = {
    "id": 9007199254740993,  # above 2**53: must stay exact
    "customer": "c-42 ünïcode",
    "amount": "1234.50",
    "qty": 3,
    "paid": True,
    "note": None,
    "created": "2024-05-01T12:00:00.123Z",
    "day": "2024-05-01",
    "token": "AAEC/w==",
    "score": 0.25,
}

# Plain types only: the figure for "Avro encode of a 10-field record".
PLAIN_AVSC: dict[str, Any] = {
    "type": "record", "name": "Plain", "namespace": "bench",
    "fields": [
        {"name": "id", "type": "long"}, {"name": "customer", "type": "string"},
        {"name": "amount", "type": "double"}, {"name": "qty", "type": "int"},
        {"name": "paid", "type": "boolean"}, {"name": "note", "type": ["null", "string"]},
        {"name": "region", "type": "string"}, {"name": "sku", "type": "string"},
        {"name": "ts", "type": "long"}, {"name": "score", "type": "float"},
    ],
}

PLAIN_JSON: dict[str, Any] = {
    "id": 1234567, "customer": "c-42", "amount": 12.5, "qty": 3, "paid": True, "note": None,
    "region": "eu", "sku": "SKU-1", "ts": 1700000000000, "score": 0.5,
}


def write_avsc(folder: Path, schema: dict[str, Any] = ORDER_AVSC, name: str = "order.avsc") -> str:
    path = folder / name
    path.write_text(json.dumps(schema, indent=2))
    return str(path)


F = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, *, label: int = F.LABEL_OPTIONAL,
           type_name: str | None = None) -> F:
    field = F(name=name, number=number, type=kind, label=label)  # type: ignore[arg-type]
    if type_name:
        field.type_name = type_name
    return field


def shop_file(package: str = "shop.v1", name: str = "shop/v1/order.proto"
              ) -> descriptor_pb2.FileDescriptorProto:
    """shop.v1: ``Order`` (index 0) with a nested ``Address`` (index [0, 0]),
    repeated ``Item``s, two maps (one of messages, int32 keys), an enum, int64,
    bytes, a float, a oneof and a Timestamp; ``Item`` (index 1)."""
    f = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
    f.dependency.append("google/protobuf/timestamp.proto")
    p = f".{package}"
    order = f.message_type.add(name="Order")
    order.field.extend([
        _field("id", 1, F.TYPE_INT64),
        _field("customer", 2, F.TYPE_STRING),
        _field("amount", 3, F.TYPE_DOUBLE),
        _field("qty", 4, F.TYPE_INT32),
        _field("paid", 5, F.TYPE_BOOL),
        _field("token", 6, F.TYPE_BYTES),
        _field("status", 7, F.TYPE_ENUM, type_name=f"{p}.Status"),
        _field("items", 8, F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=f"{p}.Item"),
        _field("address", 9, F.TYPE_MESSAGE, type_name=f"{p}.Order.Address"),
        _field("labels", 10, F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
               type_name=f"{p}.Order.LabelsEntry"),
        _field("created", 11, F.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp"),
        _field("tags", 12, F.TYPE_STRING, label=F.LABEL_REPEATED),
        _field("weight", 13, F.TYPE_FLOAT),
        _field("email", 14, F.TYPE_STRING),
        _field("phone", 15, F.TYPE_STRING),
        _field("slots", 16, F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
               type_name=f"{p}.Order.SlotsEntry"),
    ])
    order.oneof_decl.add(name="contact")
    order.field[13].oneof_index = 0
    order.field[14].oneof_index = 0
    address = order.nested_type.add(name="Address")
    address.field.extend([_field("city", 1, F.TYPE_STRING), _field("zip", 2, F.TYPE_STRING)])
    entry = order.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    entry.field.extend([_field("key", 1, F.TYPE_STRING), _field("value", 2, F.TYPE_STRING)])
    slots = order.nested_type.add(name="SlotsEntry")
    slots.options.map_entry = True
    slots.field.extend([_field("key", 1, F.TYPE_INT32),
                        _field("value", 2, F.TYPE_MESSAGE, type_name=f"{p}.Item")])
    item = f.message_type.add(name="Item")
    item.field.extend([_field("sku", 1, F.TYPE_STRING), _field("count", 2, F.TYPE_UINT64)])
    status = f.enum_type.add(name="Status")
    status.value.add(name="STATUS_UNSPECIFIED", number=0)
    status.value.add(name="PAID", number=1)
    return f


def write_descriptor_set(folder: Path, *, include_timestamp: bool = True,
                         name: str = "shop.pb", package: str = "shop.v1") -> str:
    fds = descriptor_pb2.FileDescriptorSet()
    if include_timestamp:
        ts = descriptor_pb2.FileDescriptorProto()
        timestamp_pb2.DESCRIPTOR.CopyToProto(ts)
        fds.file.append(ts)
    fds.file.append(shop_file(package))
    path = folder / name
    path.write_bytes(fds.SerializeToString())
    return str(path)


PROTO_ORDER_JSON: dict[str, Any] = {
    "id": "9007199254740993",
    "customer": "c-42",
    "amount": 12.5,
    "qty": 3,
    "paid": True,
    "token": "AAEC/w==",
    "status": "PAID",
    "items": [{"sku": "A-1", "count": "2"}, {"sku": "B-2", "count": "18446744073709551615"}],
    "address": {"city": "Lyon", "zip": "69001"},
    "labels": {"channel": "web", "lang": "fr"},
    "created": "2024-05-01T12:00:00.123Z",
    "tags": ["new", "gift"],
}
