"""The Redis sinks' own promises, beyond the conformance kit: per-command
errors mapped to the message that caused them, batches larger than a chunk,
trimming, expiry, key templates, and header names that would collide."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from natsconn_redis.kv_sink import RedisKvSink
from natsconn_redis.list_sink import RedisListSink
from natsconn_redis.stream_sink import RedisStreamSink
from natsconn_redis.stream_source import RedisStreamSource

from connector import Message, PartialWriteError, RejectedError, RetryableError
from connector.testing.kit import collect

from .redis_helpers import at

pytestmark = pytest.mark.integration


async def test_wrong_type_rejects_only_its_messages(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    """A key of the wrong type poisons the messages bound for it, nothing else."""
    await r.set(f"it:{unique}:taken", "a string")
    sink = RedisStreamSink.make_test_instance(**at(redis_address),
                                              stream=f"it:{unique}:{{subject}}")
    await sink.connect()
    try:
        batch = [Message(b"0", "good"), Message(b"1", "taken"), Message(b"2", "good"),
                 Message(b"3", None)]
        with pytest.raises(PartialWriteError) as caught:
            await sink.write_batch(batch)
    finally:
        await sink.close()
    failed = caught.value.failed
    assert set(failed) == {1, 3}, failed
    assert isinstance(failed[1], RejectedError) and "WRONGTYPE" in str(failed[1])
    assert f"it:{unique}:taken" in str(failed[1])
    assert isinstance(failed[3], RejectedError) and "no subject" in str(failed[3])
    entries: Any = await r.xrange(f"it:{unique}:good")
    assert [f[b"data"] for _, f in entries] == [b"0", b"2"]


async def test_header_that_would_overwrite_a_field_is_rejected(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    stream = f"it:{unique}:hdr"
    plain = RedisStreamSink.make_test_instance(**at(redis_address), stream=stream)
    prefixed = RedisStreamSink.make_test_instance(**at(redis_address), stream=stream,
                                                  header_prefix="h:")
    message = Message(b"x", "s", None, {"data": "not the payload"})
    await plain.connect()
    await prefixed.connect()
    try:
        with pytest.raises(PartialWriteError) as caught:
            await plain.write_batch([message])
        assert "header_prefix" in str(caught.value.failed[0])
        await prefixed.write_batch([message])
    finally:
        await plain.close()
        await prefixed.close()
    entries: Any = await r.xrange(stream)
    assert [f for _, f in entries] == [{b"data": b"x", b"subject": b"s",
                                        b"h:data": b"not the payload"}]


async def test_batch_larger_than_a_chunk_keeps_order(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    n = 2500
    stream, queue = f"it:{unique}:big", f"it:{unique}:bigq"
    batch = [Message(b"%d" % i, "s", None, {}, None, f"id-{i}") for i in range(n)]
    xadd = RedisStreamSink.make_test_instance(**at(redis_address), stream=stream,
                                              chunk_size=1000, id_field="natsconn-id")
    push = RedisListSink.make_test_instance(**at(redis_address), key=queue, chunk_size=1000)
    for sink in (xadd, push):
        await sink.connect()
        try:
            await sink.write_batch(batch)
        finally:
            await sink.close()
    entries: Any = await r.xrange(stream)
    assert [int(f[b"data"]) for _, f in entries] == list(range(n))
    assert entries[7][1][b"natsconn-id"] == b"id-7"
    values: Any = await r.lrange(queue, 0, -1)
    assert [int(v) for v in reversed(values)] == list(range(n))  # LPUSH: oldest at the tail


async def test_list_sink_to_many_keys_keeps_each_order(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    sink = RedisListSink.make_test_instance(**at(redis_address), push="right",
                                            key=f"it:{unique}:l:{{subject[-1]}}")
    await sink.connect()
    try:
        await sink.write_batch([Message(b"%d" % i, f"q.{i % 3}") for i in range(30)])
    finally:
        await sink.close()
    for k in range(3):
        values: Any = await r.lrange(f"it:{unique}:l:{k}", 0, -1)  # RPUSH: oldest first
        assert [int(v) for v in values] == list(range(k, 30, 3))


async def test_stream_maxlen_trims(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    stream = f"it:{unique}:trim"
    sink = RedisStreamSink.make_test_instance(**at(redis_address), stream=stream, maxlen=100,
                                              exact_maxlen=True)
    await sink.connect()
    try:
        for _ in range(5):
            await sink.write_batch([Message(b"x")] * 100)
    finally:
        await sink.close()
    assert await r.xlen(stream) == 100


async def test_kv_ttl_and_templates(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    set_sink = RedisKvSink.make_test_instance(**at(redis_address), ttl="30s",
                                              key=f"it:{unique}:kv:{{header[Id]}}")
    hset_sink = RedisKvSink.make_test_instance(**at(redis_address), command="hset", ttl="1m",
                                               key=f"it:{unique}:h:{{subject[0]}}",
                                               field="{subject[1]}")
    for sink in (set_sink, hset_sink):
        await sink.connect()
    try:
        await set_sink.write_batch([Message(b"v1", None, None, {"Id": "a"}),
                                    Message(b"v2", None, None, {"Id": "a"})])
        with pytest.raises(PartialWriteError) as caught:
            await set_sink.write_batch([Message(b"v3", None, None, {"Id": "b"}),
                                        Message(b"no id")])
        assert "Id" in str(caught.value.failed[1])
        await hset_sink.write_batch([Message(b"1", "users.ann"), Message(b"2", "users.bob")])
    finally:
        await set_sink.close()
        await hset_sink.close()
    assert await r.get(f"it:{unique}:kv:a") == b"v2"  # the last write for a key wins
    assert await r.get(f"it:{unique}:kv:b") == b"v3"
    assert 0 < await r.pttl(f"it:{unique}:kv:a") <= 30_000
    assert await r.hgetall(f"it:{unique}:h:users") == {b"ann": b"1", b"bob": b"2"}
    assert 30_000 < await r.pttl(f"it:{unique}:h:users") <= 60_000


async def test_unreachable_server_is_retryable(unique: str) -> None:
    sink = RedisListSink.make_test_instance(host="127.0.0.1", port=1, key="k",
                                            connect_timeout=1,
                                            reconnect={"attempts": 0})
    with pytest.raises(RetryableError, match=r"cannot connect to redis at 127\.0\.0\.1:1/0"):
        await sink.connect()
    await sink.close()


async def test_create_stream_false_rejects_what_has_no_stream(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    await r.xadd(f"it:{unique}:exists", {"data": b"first"})
    sink = RedisStreamSink.make_test_instance(**at(redis_address), create_stream=False,
                                              stream=f"it:{unique}:{{subject}}")
    await sink.connect()
    try:
        with pytest.raises(PartialWriteError) as caught:
            await sink.write_batch([Message(b"a", "exists"), Message(b"b", "missing")])
    finally:
        await sink.close()
    assert set(caught.value.failed) == {1}
    assert "does not exist" in str(caught.value.failed[1])
    assert await r.exists(f"it:{unique}:missing") == 0
    assert await r.xlen(f"it:{unique}:exists") == 2


async def test_bytes_that_are_not_utf8_go_through_redis_byte_for_byte(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    """A stream entry whose subject and header fields are not UTF-8 is read as
    text holding lone surrogates (surrogateescape, as the Kafka source reads a
    binary header) and written back as the very same bytes. Before: the source
    replaced them with U+FFFD, and a Kafka binary header made the sink's write
    fail with a UnicodeEncodeError, retried for ever."""
    src, dst = f"it:{unique}:raw-in", f"it:{unique}:raw-out"
    raw = {b"data": b"\x00\xff payload", b"subject": b"orders.\xff",
           b"h": b"\xff\xfe", b"name\xc3": b"ok", b"text": "é".encode()}
    await r.xadd(src, raw)  # type: ignore[arg-type]
    source = RedisStreamSource.make_test_instance(**at(redis_address), streams=[src],
                                                  group="g", consumer="c1")
    sink = RedisStreamSink.make_test_instance(**at(redis_address), stream=dst)
    await source.connect()
    await sink.connect()
    try:
        [m] = await collect(source, 1, 10)
        assert m.subject == "orders.\udcff"
        assert dict(m.headers) == {"h": "\udcff\udcfe", "name\udcc3": "ok", "text": "é"}
        kafka_style = Message(b"k", "s", None,
                              {"bin": b"\x80\x00\xfe".decode("utf-8", "surrogateescape")})
        await sink.write_batch([m, kafka_style])
    finally:
        await source.close()
        await sink.close()
    entries: Any = await r.xrange(dst)
    assert [f for _, f in entries] == [raw, {b"data": b"k", b"subject": b"s",
                                             b"bin": b"\x80\x00\xfe"}]
