"""The Confluent wire format: what a schema-registry serializer puts before the payload.

    byte 0       magic byte, always 0
    bytes 1..4   schema id, 4-byte big-endian unsigned
    (Protobuf)   the message-index path: a zigzag varint count, then that many
                 zigzag varints, each the index of a message in its file or in
                 its parent message; the common path ``[0]`` (the file's first
                 message) is written as the single byte 0
    rest         the Avro / Protobuf / JSON payload itself

Errors are :class:`RejectedError`: a payload that does not carry a valid
header is poison, whatever the registry says.
"""

from __future__ import annotations

from collections.abc import Sequence

from connector import RejectedError

MAGIC = 0
HEADER_SIZE = 5
_MAX_VARINT_BYTES = 10  # a 64-bit value
_MAX_INDEXES = 64  # deeper nesting than this is a corrupt header, not a schema


def header(schema_id: int, indexes: Sequence[int] | None = None) -> bytes:
    """The bytes before the payload: magic byte, schema id and, for Protobuf, the
    message-index path (``indexes``; ``None`` for Avro and JSON)."""
    if not 0 <= schema_id <= 0xFFFFFFFF:
        raise ValueError(f"schema id {schema_id} does not fit 4 bytes")
    head = bytes((MAGIC,)) + schema_id.to_bytes(4, "big")
    if indexes is None:
        return head
    return head + encode_indexes(indexes)


def encode_indexes(indexes: Sequence[int]) -> bytes:
    """The message-index path as Confluent writes it (``[0]`` is one 0 byte)."""
    if len(indexes) == 1 and indexes[0] == 0:
        return b"\x00"
    out = bytearray(_varint(_zigzag(len(indexes))))
    for index in indexes:
        out += _varint(_zigzag(index))
    return bytes(out)


def split(data: bytes) -> tuple[int, int]:
    """Check the Confluent header of ``data``: ``(schema_id, offset of what follows)``."""
    if len(data) < HEADER_SIZE:
        raise RejectedError(
            f"payload of {len(data)} byte(s) is shorter than the Confluent header (magic "
            "byte 0 and a 4-byte schema id): not in the Confluent wire format")
    if data[0] != MAGIC:
        raise RejectedError(
            f"bad magic byte 0x{data[0]:02x}, expected 0x00: the payload is not in the "
            "Confluent wire format (wire_format: none reads plain payloads)")
    return int.from_bytes(data[1:5], "big"), HEADER_SIZE


def read_indexes(data: bytes, offset: int) -> tuple[list[int], int]:
    """The Protobuf message-index path at ``offset``: ``(indexes, offset after it)``."""
    count, offset = _read_varint(data, offset)
    count = _unzigzag(count)
    if count == 0:
        return [0], offset
    if count < 0 or count > _MAX_INDEXES:
        raise RejectedError(f"corrupt Confluent header: message-index count {count}")
    indexes = []
    for _ in range(count):
        value, offset = _read_varint(data, offset)
        value = _unzigzag(value)
        if value < 0:
            raise RejectedError(f"corrupt Confluent header: negative message index {value}")
        indexes.append(value)
    return indexes, offset


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _unzigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(offset, min(len(data), offset + _MAX_VARINT_BYTES)):
        byte = data[i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i + 1
        shift += 7
    if len(data) - offset >= _MAX_VARINT_BYTES:
        raise RejectedError("corrupt Confluent header: a message-index varint runs past 10 bytes")
    raise RejectedError("truncated Confluent header: the Protobuf message-index path ends "
                        "before its last varint")
