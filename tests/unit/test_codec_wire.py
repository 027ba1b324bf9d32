"""The Confluent wire format: framing, message indexes, and every malformed header."""

from __future__ import annotations

import pytest
from natsconn_codec import wire

from connector import RejectedError


def test_header_is_magic_byte_and_big_endian_id() -> None:
    assert wire.header(1) == b"\x00\x00\x00\x00\x01"
    assert wire.header(0x01020304) == b"\x00\x01\x02\x03\x04"
    assert wire.header(0xFFFFFFFF) == b"\x00\xff\xff\xff\xff"
    with pytest.raises(ValueError, match="does not fit 4 bytes"):
        wire.header(1 << 32)


def test_split_reads_the_id_and_the_payload_offset() -> None:
    data = wire.header(258) + b"payload"
    schema_id, offset = wire.split(data)
    assert (schema_id, data[offset:]) == (258, b"payload")
    # a header with an empty payload is still a header
    assert wire.split(wire.header(7)) == (7, 5)


@pytest.mark.parametrize(("indexes", "encoded"), [
    ([0], b"\x00"),                      # the common case: one zero byte
    ([1], b"\x02\x02"),                  # count 1, index 1 (zigzag: 1 -> 2)
    ([0, 0], b"\x04\x00\x00"),           # first nested message of the first message
    ([1, 2], b"\x04\x02\x04"),
    ([64], b"\x02\x80\x01"),             # zigzag(64) = 128: a two-byte varint
])
def test_message_indexes_as_confluent_writes_them(indexes: list[int], encoded: bytes) -> None:
    assert wire.encode_indexes(indexes) == encoded
    assert wire.header(5, indexes) == wire.header(5) + encoded
    data = wire.header(5, indexes) + b"rest"
    schema_id, offset = wire.split(data)
    read, after = wire.read_indexes(data, offset)
    assert (schema_id, read, data[after:]) == (5, indexes, b"rest")


def test_bad_magic_byte_is_rejected_with_the_byte_found() -> None:
    with pytest.raises(RejectedError, match=r"bad magic byte 0x7b, expected 0x00.*wire_format"):
        wire.split(b'{"plain": "json"}')
    with pytest.raises(RejectedError, match="bad magic byte 0x01"):
        wire.split(b"\x01\x00\x00\x00\x01rest")


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x00\x01"])
def test_truncated_header_is_rejected(data: bytes) -> None:
    with pytest.raises(RejectedError, match=rf"payload of {len(data)} byte\(s\) is shorter "
                                            r"than the Confluent header"):
        wire.split(data)


def test_truncated_message_indexes_are_rejected() -> None:
    data = wire.header(1) + b"\x04\x02"  # says two indexes, holds one
    with pytest.raises(RejectedError, match="truncated Confluent header"):
        wire.read_indexes(data, 5)
    with pytest.raises(RejectedError, match="truncated Confluent header"):
        wire.read_indexes(wire.header(1) + b"\x02\x80", 5)  # a varint cut in the middle
    with pytest.raises(RejectedError, match="truncated Confluent header"):
        wire.read_indexes(wire.header(1), 5)  # no index path at all


def test_corrupt_message_indexes_are_rejected() -> None:
    with pytest.raises(RejectedError, match="message-index count"):
        wire.read_indexes(b"\x01", 0)  # zigzag 1 = -1 indexes
    with pytest.raises(RejectedError, match="message-index count 1000"):
        wire.read_indexes(wire.encode_indexes([0] * 1000), 0)
    with pytest.raises(RejectedError, match="negative message index"):
        wire.read_indexes(b"\x02\x01", 0)
    with pytest.raises(RejectedError, match="runs past 10 bytes"):
        wire.read_indexes(b"\xff" * 12, 0)
