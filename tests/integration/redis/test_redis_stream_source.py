"""The ``redis_stream`` source's own promises, beyond the conformance kit:
the delivery limit and its dead-letter stream, replicas sharing a group, the
nack delay, in-progress signals holding off a takeover, a group created where
asked, and the field mapping."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from natsconn_redis.stream_source import RedisStreamSource

from connector import Batch, Message
from connector.testing.kit import collect, collect_batches

from ..helpers import assert_exactly, seq_of
from .redis_helpers import at, fill_stream, pending

pytestmark = pytest.mark.integration


def _source(address: tuple[str, int], stream: str, **options: Any) -> RedisStreamSource:
    options.setdefault("group", "g")
    options.setdefault("consumer", "c1")
    return RedisStreamSource.make_test_instance(**at(address), streams=[stream], **options)


async def _open(source: RedisStreamSource) -> RedisStreamSource:
    await source.connect()
    return source


async def test_max_deliveries_moves_entries_to_the_dead_letter_stream(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    """Delivered twice without a verdict (two runs died holding them): the third
    run does not deliver them, it moves them to ``<stream>:dead-letter``."""
    stream = f"it:{unique}:poison"
    await r.xadd(stream, {"data": b"poison-1", "subject": "orders.x", "Tenant": "t1"})
    await r.xadd(stream, {"data": b"poison-2"})
    for run in (1, 2):
        source = await _open(_source(redis_address, stream, max_deliveries=2))
        got = await collect(source, 2, 10, ack=False)
        assert sorted(m.data for m in got) == [b"poison-1", b"poison-2"], run
        await source.close()  # no ack: as if the process had died

    third = await _open(_source(redis_address, stream, max_deliveries=2))
    try:
        assert await collect(third, 1, 2) == []
        await r.xadd(stream, {"data": b"fine"})
        assert [m.data for m in await collect(third, 1, 10)] == [b"fine"]
    finally:
        await third.close()
    assert await pending(r, stream, "g") == 0
    dead: Any = await r.xrange(f"{stream}:dead-letter")
    assert [f[b"data"] for _, f in dead] == [b"poison-1", b"poison-2"]
    fields = dead[0][1]
    assert fields[b"subject"] == b"orders.x" and fields[b"Tenant"] == b"t1"
    assert fields[b"Natsconn-Error-Kind"] == b"max_deliveries"
    assert fields[b"Natsconn-Attempts"] == b"2"
    assert fields[b"Natsconn-Source-Id"].startswith(f"{stream}:".encode())
    assert b"max_deliveries 2" in fields[b"Natsconn-Error"]


async def test_replicas_share_the_group(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    stream = f"it:{unique}:shared"
    n = 4000
    await fill_stream(r, stream, n)
    one = await _open(_source(redis_address, stream, consumer="replica-1"))
    two = await _open(_source(redis_address, stream, consumer="replica-2"))
    try:
        first, second = await asyncio.gather(collect(one, n, 5, max_messages=50),
                                             collect(two, n, 5, max_messages=50))
    finally:
        await one.close()
        await two.close()
    assert first and second, (len(first), len(second))
    assert_exactly([seq_of(m.data) for m in first + second], n, "two replicas together")
    assert await pending(r, stream, "g") == 0


async def test_nack_delay_is_honoured(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    stream = f"it:{unique}:nack"
    await fill_stream(r, stream, 5)
    source = await _open(_source(redis_address, stream, min_idle_time=5.0,
                                 claim_interval=0.2))
    try:
        batches = await collect_batches(source, 5, 10)
        nacked = time.monotonic()
        for batch in batches:
            await batch.ack.nack(2.0)
        back = await collect(source, 5, 15)
        waited = time.monotonic() - nacked
    finally:
        await source.close()
    assert sorted(seq_of(m.data) for m in back) == list(range(5))
    assert waited >= 1.9, f"redelivered after {waited:.2f}s, before the nack's 2s delay"
    assert all(m.headers["Natsconn-Delivery-Count"] == "2" for m in back)


async def test_in_progress_holds_off_a_takeover(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    """A long write keeps its entries: another replica claims them only once the
    replica holding them is gone (its in-progress signals, and the source's own
    keep-alive of unsettled entries, stop) and min_idle_time passes."""
    stream = f"it:{unique}:slow"
    await fill_stream(r, stream, 3)
    options = {"min_idle_time": 1.0, "claim_interval": 0.2}
    slow = await _open(_source(redis_address, stream, consumer="slow", **options))
    other = await _open(_source(redis_address, stream, consumer="other", **options))
    try:
        held: list[Batch] = await collect_batches(slow, 3, 10)
        loop = asyncio.get_running_loop()
        until = loop.time() + 3.0  # three times min_idle_time
        stolen: list[Message] = []
        while loop.time() < until:
            for batch in held:
                await batch.ack.in_progress()
            stolen += await collect(other, 3, 0.3)
        assert stolen == [], "entries taken over while in-progress signals kept coming"
        stolen += await collect(other, 3, 3.0)  # the source alone keeps them too
        assert stolen == [], "entries taken over while the replica holding them lives"
        await slow.close()
        taken = await collect(other, 3, 10)  # gone: taken over
    finally:
        await slow.close()
        await other.close()
    assert sorted(seq_of(m.data) for m in taken) == [0, 1, 2]


async def test_existing_group_only_when_create_group_is_false(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    stream = f"it:{unique}:nogroup"
    source = _source(redis_address, stream, create_group=False)
    with pytest.raises(Exception, match="has no consumer group 'g'"):
        await source.connect()
    await source.close()
    await r.xadd(stream, {"data": b"old"})
    await r.xgroup_create(stream, "g", id="$")
    await r.xadd(stream, {"data": b"new"})
    source = await _open(_source(redis_address, stream, create_group=False))
    try:
        assert [m.data for m in await collect(source, 2, 3)] == [b"new"]
    finally:
        await source.close()


async def test_start_id_dollar_skips_history(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    stream = f"it:{unique}:start"
    await r.xadd(stream, {"data": b"before"})
    source = await _open(_source(redis_address, stream, start_id="$"))
    try:
        await r.xadd(stream, {"data": b"after"})
        assert [m.data for m in await collect(source, 2, 3)] == [b"after"]
    finally:
        await source.close()


async def test_field_mapping(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    stream = f"it:{unique}:fields"
    added: Any = await r.xadd(stream, {"body": b"\xff\x00payload", "topic": "a.b",
                                       "h.Tenant": "t1", "other": "o"})
    entry_id = added.decode()
    await r.xadd(stream, {"unrelated": "only"})
    source = await _open(_source(redis_address, stream, data_field="body",
                                 subject_field="topic", key_field=None, header_prefix="h."))
    try:
        first, second = await collect(source, 2, 5)
    finally:
        await source.close()
    assert first.data == b"\xff\x00payload" and first.subject == "a.b" and first.key is None
    assert first.headers == {"Tenant": "t1", "other": "o"}
    assert first.id == f"{stream}:{entry_id}"
    assert first.timestamp == int(entry_id.split("-")[0]) / 1000
    # no data field: empty data; no subject field: the stream's name
    assert (second.data, second.subject, dict(second.headers)) == (
        b"", stream, {"unrelated": "only"})


async def test_a_dead_letter_stream_that_cannot_be_written_keeps_the_entry_pending(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    stream = f"it:{unique}:stuck"
    await r.set(f"{stream}:dead-letter", "a string, not a stream")
    await r.xadd(stream, {"data": b"poison"})
    source = await _open(_source(redis_address, stream, max_deliveries=1))
    assert len(await collect(source, 1, 5, ack=False)) == 1
    await source.close()
    again = await _open(_source(redis_address, stream, max_deliveries=1))
    try:
        assert await collect(again, 1, 2) == []
    finally:
        await again.close()
    assert await pending(r, stream, "g") == 1, "acknowledged although not dead-lettered"
    await r.delete(f"{stream}:dead-letter")
    third = await _open(_source(redis_address, stream, max_deliveries=1))
    try:
        assert await collect(third, 1, 2) == []
    finally:
        await third.close()
    assert await pending(r, stream, "g") == 0
    assert await r.xlen(f"{stream}:dead-letter") == 1


async def test_acks_of_batches_settled_one_after_another_share_one_xack(
        r: aioredis.Redis, redis_address: tuple[str, int], unique: str) -> None:
    """The engine settles the reads of a written batch one after another; each
    ack returns at once and one XACK carries them all, so settling costs no round
    trip per read. Nothing stays pending once the source is closed."""
    stream = f"it:{unique}:acks"
    await fill_stream(r, stream, 200)
    source = await _open(_source(redis_address, stream))
    try:
        batches = await collect_batches(source, 200, 10, max_messages=10)
        assert len(batches) == 20 and sum(len(b.messages) for b in batches) == 200
        assert await pending(r, stream, "g") == 200
        before = (await r.info("commandstats")).get("cmdstat_xack", {}).get("calls", 0)
        for batch in batches:
            await batch.ack.ack()
    finally:
        await source.close()
    after = (await r.info("commandstats"))["cmdstat_xack"]["calls"]
    assert after - before <= 2, f"{after - before} XACKs for 20 acknowledged reads"
    assert await pending(r, stream, "g") == 0
