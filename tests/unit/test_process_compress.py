"""``compress`` and ``decompress``: round trips, levels, the Content-Encoding
header, auto detection, garbage, and the decompression-bomb bound."""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Any

import cramjam
import pytest
from natsconn_process import _lz4
from natsconn_process.compress import Compress
from natsconn_process.decompress import Decompress
from pydantic import ValidationError

from connector import Message, Rejected

from ._process import dlq, finish, make_pipeline, parts, run

ALGORITHMS = ["gzip", "zstd", "lz4", "snappy"]
PAYLOAD = b'{"id": 1, "text": "' + b"hello world " * 40 + b'"}'
MIB = 1024 * 1024


def compress(algorithm: str, data: bytes = PAYLOAD, **options: Any) -> Message:
    (out,) = run(Compress.make_test_instance(algorithm=algorithm, **options),
                 Message(data, "s", b"k", {"H": "v"}, 1.0, "id-1"))
    assert isinstance(out, Message)
    return out


def decompress(message: Message, **options: Any) -> Message | Rejected:
    (out,) = run(Decompress.make_test_instance(**options), message)
    assert isinstance(out, Message | Rejected)
    return out


def reason(message: Message, **options: Any) -> str:
    out = decompress(message, **options)
    assert isinstance(out, Rejected), out
    assert out.message is message
    return out.reason


def foreign(algorithm: str, data: bytes) -> bytes:
    """Compressed by another implementation than the transform's."""
    if algorithm == "gzip":
        return gzip.compress(data)
    return bytes(getattr(cramjam, algorithm).compress(data))


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip_keeps_everything_and_sets_then_removes_the_header(algorithm: str) -> None:
    packed = compress(algorithm)
    assert packed.data != PAYLOAD and len(packed.data) < len(PAYLOAD)
    assert packed.headers == {"H": "v", "Content-Encoding": algorithm}
    assert (packed.subject, packed.key, packed.timestamp, packed.id) == ("s", b"k", 1.0, "id-1")
    back = decompress(packed)
    assert isinstance(back, Message)
    assert back.data == PAYLOAD
    assert back.headers == {"H": "v"}
    assert (back.subject, back.key, back.timestamp, back.id) == ("s", b"k", 1.0, "id-1")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_formats_are_the_standard_framed_ones(algorithm: str) -> None:
    packed = compress(algorithm)
    if algorithm == "gzip":
        assert gzip.decompress(packed.data) == PAYLOAD
    else:
        assert bytes(getattr(cramjam, algorithm).decompress(packed.data)) == PAYLOAD
    back = decompress(Message(foreign(algorithm, PAYLOAD)), algorithm=algorithm)
    assert isinstance(back, Message) and back.data == PAYLOAD


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_auto_without_a_header_goes_by_the_magic_number(algorithm: str) -> None:
    back = decompress(Message(foreign(algorithm, PAYLOAD)))
    assert isinstance(back, Message) and back.data == PAYLOAD


def test_auto_passes_uncompressed_and_identity_messages_unchanged() -> None:
    plain = Message(PAYLOAD)
    assert decompress(plain) is plain
    identity = Message(PAYLOAD, headers={"Content-Encoding": "identity"})
    assert decompress(identity) is identity


def test_auto_trusts_the_header_over_the_magic_number() -> None:
    zstd_data = foreign("zstd", PAYLOAD)
    assert "not valid gzip" in reason(Message(zstd_data, headers={"Content-Encoding": "gzip"}))
    named = decompress(Message(foreign("gzip", PAYLOAD), headers={"Content-Encoding": " GZIP "}))
    assert isinstance(named, Message) and named.data == PAYLOAD


def test_auto_rejects_an_encoding_it_does_not_know() -> None:
    assert reason(Message(b"x", headers={"Content-Encoding": "br"})) == (
        "decompress: unsupported Content-Encoding 'br' (expected gzip, zstd, lz4, snappy or "
        "identity)")


def test_a_header_of_another_name_or_none() -> None:
    packed = compress("zstd", header="X-Packed")
    assert packed.headers["X-Packed"] == "zstd" and "Content-Encoding" not in packed.headers
    back = decompress(packed, header="X-Packed")
    assert isinstance(back, Message) and back.headers == {"H": "v"}
    bare = compress("lz4", header=None)
    assert bare.headers == {"H": "v"}
    assert isinstance(b := decompress(bare, header=None), Message) and b.data == PAYLOAD


def test_compress_passes_on_a_message_that_is_compressed_already() -> None:
    t = Compress.make_test_instance(algorithm="gzip")
    done = Message(b"zzz", headers={"Content-Encoding": "zstd"})
    identity = Message(PAYLOAD, headers={"Content-Encoding": "identity"})
    out = run(t, done, identity)
    assert out[0] is done
    assert isinstance(out[1], Message) and out[1].headers["Content-Encoding"] == "gzip"


@pytest.mark.parametrize(("algorithm", "level"), [
    ("gzip", 1), ("gzip", 9), ("zstd", 1), ("zstd", 19), ("lz4", 0), ("lz4", 3), ("lz4", 12)])
def test_levels_are_used(algorithm: str, level: int) -> None:
    data = os.urandom(64) * 200 + bytes(range(256)) * 20
    packed = compress(algorithm, data, level=level)
    back = decompress(packed)
    assert isinstance(back, Message) and back.data == data


def test_higher_levels_compress_better() -> None:
    text = b" ".join(str(i * 7919 % 10007).encode() for i in range(5000))
    assert len(compress("zstd", text, level=19).data) < len(compress("zstd", text, level=1).data)
    assert len(compress("gzip", text, level=9).data) < len(compress("gzip", text, level=1).data)


@pytest.mark.parametrize(("options", "expected"), [
    ({"algorithm": "snappy", "level": 1}, "snappy takes no level"),
    ({"algorithm": "gzip", "level": 10}, "gzip takes 0..9, found 10"),
    ({"algorithm": "zstd", "level": 0}, "zstd takes 1..22, found 0"),
    ({"algorithm": "lz4", "level": 13}, "lz4 takes 0..12, found 13"),
    ({"algorithm": "brotli"}, "gzip"),
    ({}, "algorithm"),
])
def test_compress_config_errors(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        Compress.make_test_instance(**options)


def test_decompress_config_errors() -> None:
    with pytest.raises(ValidationError, match="auto"):
        Decompress.make_test_instance(algorithm="brotli")
    with pytest.raises(ValidationError, match="greater than 0"):
        Decompress.make_test_instance(max_size=0)
    assert Decompress.make_test_instance(max_size="1MiB").config.max_size == MIB


# ------------------------------------------------------------------ garbage


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_garbage_is_rejected_with_the_reason(algorithm: str) -> None:
    text = reason(Message(b"definitely not compressed"), algorithm=algorithm)
    assert text.startswith(f"decompress: data is not valid {algorithm}: ")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_truncated_data_is_rejected(algorithm: str) -> None:
    whole = foreign(algorithm, os.urandom(5000))
    assert "not valid" in reason(Message(whole[: len(whole) // 2]), algorithm=algorithm)


def test_several_gzip_members_in_a_row_are_one_payload() -> None:
    back = decompress(Message(gzip.compress(b"one,") + gzip.compress(b"two")))
    assert isinstance(back, Message) and back.data == b"one,two"


def test_a_batch_with_garbage_rejects_only_that_message() -> None:
    t = Decompress.make_test_instance(algorithm="zstd")
    good = Message(foreign("zstd", b"fine"))
    out = run(t, good, Message(b"junk"), good)
    assert [type(o).__name__ for o in out] == ["Message", "Rejected", "Message"]


# ------------------------------------------------------------------ bombs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_bomb_is_rejected_without_expanding_it(algorithm: str) -> None:
    bomb = foreign(algorithm, bytes(8 * MIB))
    assert len(bomb) < 512 * 1024
    assert reason(Message(bomb), max_size="1MiB") == (
        f"decompress: {algorithm} data expands beyond max_size (1MiB); rejected as a possible "
        "decompression bomb")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_max_size_is_exact(algorithm: str) -> None:
    limit = 300 * 1024 + 7  # beyond the first buffer, so the buffer grows
    for size, fits in ((limit, True), (limit + 1, False), (limit - 1, True)):
        data = os.urandom(1024) * (size // 1024) + os.urandom(size % 1024)
        out = decompress(Message(foreign(algorithm, data)), max_size=limit)
        if fits:
            assert isinstance(out, Message) and out.data == data, (algorithm, size)
        else:
            assert isinstance(out, Rejected) and "beyond max_size" in out.reason


def test_the_default_max_size_is_64_mib() -> None:
    assert Decompress.make_test_instance().config.max_size == 64 * MIB
    bomb = zlib.compress(bytes(64 * MIB + 1), 9, 31)
    assert "beyond max_size (64MiB)" in reason(Message(bomb))


def test_the_buffer_grows_for_large_payloads_and_small_ones_still_work_after() -> None:
    t = Decompress.make_test_instance(algorithm="zstd", max_size="16MiB")
    big = os.urandom(1024) * 3000  # about 3 MB, beyond the first buffer
    small = b"small"
    out = run(t, Message(foreign("zstd", big)), Message(foreign("zstd", small)),
              Message(foreign("zstd", big)))
    assert [o.data for o in out if isinstance(o, Message)] == [big, small, big]


# ------------------------------------------------------------ through the engine


async def test_through_the_engine_garbage_is_dead_lettered_the_rest_flows() -> None:
    pipe = make_pipeline(transforms=[{"type": "compress", "algorithm": "zstd"},
                                     {"type": "decompress", "algorithm": "auto"},
                                     {"type": "decompress", "algorithm": "gzip"}],
                         dead_letter={"type": "fake"},
                         batch={"max_messages": 10, "max_wait": "1ms"})
    source, sink = parts(pipe)
    ack = source.feed([Message(gzip.compress(b"a"), "s", id="ok"),
                       Message(b"plain", "s", id="bad")])
    await finish(pipe)
    assert [(m.id, m.data) for m in sink.written] == [("ok", b"a")]
    (letter,) = dlq(pipe).written
    assert letter.id == "bad"
    assert letter.headers["Natsconn-Error"].startswith("decompress: data is not valid gzip")
    assert ack.settlements == [("ack", None)]


# ------------------------------------------------------------------ LZ4 frames


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 200_000])
@pytest.mark.parametrize("content", ["random", "zeros", "text"])
@pytest.mark.parametrize("level", [0, 9])
def test_lz4_frames_are_read_by_the_reference_decoder_and_by_ours(size: int, content: str,
                                                                  level: int) -> None:
    data = {"random": os.urandom(size), "zeros": bytes(size),
            "text": (b"natsconn lz4 frame " * (size // 19 + 1))[:size]}[content]
    packed = compress("lz4", data, level=level)
    assert packed.data.startswith(b"\x04\x22\x4d\x18")
    assert bytes(cramjam.lz4.decompress(packed.data)) == data
    back = decompress(packed, max_size=size + 1)
    assert isinstance(back, Message) and back.data == data


def test_lz4_frames_of_other_writers_and_several_frames_in_a_row_are_read() -> None:
    theirs = foreign("lz4", PAYLOAD)
    ours = compress("lz4").data
    assert _lz4.read(ours, bytearray(), MIB)[0] == PAYLOAD, "ours take the block-wise way"
    assert _lz4.read(theirs, bytearray(), MIB)[0] is None, "theirs take the full decoder"
    assert _lz4.read(ours + ours, bytearray(), MIB)[0] is None
    for data, expected in ((theirs, PAYLOAD), (ours + ours, PAYLOAD * 2),
                           (theirs + ours, PAYLOAD * 2)):
        back = decompress(Message(data), algorithm="lz4")
        assert isinstance(back, Message) and back.data == expected


def test_lz4_frames_of_ours_that_are_cut_or_corrupt_are_rejected() -> None:
    whole = compress("lz4", os.urandom(1000) * 100).data
    for broken in (whole[:-4], whole[:9], whole[:40]):
        assert "not valid lz4" in reason(Message(broken), algorithm="lz4")
    oversized_block = whole[:7] + (70_000).to_bytes(4, "little") + whole[11:]
    assert "not valid lz4" in reason(Message(oversized_block), algorithm="lz4")
    corrupt = bytearray(whole)
    corrupt[11:30] = b"\xff" * 19
    assert "not valid lz4" in reason(Message(bytes(corrupt)), algorithm="lz4")


@pytest.mark.parametrize("compressible", [True, False])
def test_lz4_frames_of_ours_stop_at_max_size(compressible: bool) -> None:
    limit = 150_000
    for size, fits in ((limit, True), (limit + 1, False)):
        data = bytes(size) if compressible else os.urandom(size)
        out = decompress(compress("lz4", data), max_size=limit)
        if fits:
            assert isinstance(out, Message) and out.data == data
        else:
            assert isinstance(out, Rejected) and "beyond max_size" in out.reason
