"""The redis_list source's acknowledgement against a real Redis: an ack returns
at once and one LREM pipeline at a time carries what was acknowledged meanwhile
(the engine settles a written batch's reads one after another)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from natsconn_redis.list_source import RedisListSource

from connector.testing.kit import collect_batches

pytestmark = pytest.mark.integration

SLACK = 3.0  # scheduling on a busy 2-core machine; far below "never"


async def _fill(r: aioredis.Redis, key: str, n: int) -> None:
    await r.rpush(key, *[b"%d" % i for i in range(n)])


async def _source(proxy: Any, key: str, socket_timeout: float) -> RedisListSource:
    source = RedisListSource.make_test_instance(
        host=proxy.host, port=proxy.port, socket_timeout=socket_timeout, key=key,
        consumer="c1")
    await source.connect()
    return source


async def test_acks_return_while_redis_is_unreachable_and_land_once_it_answers(
        tcp_proxy: Any, redis_address: tuple[str, int], r: aioredis.Redis,
        unique: str) -> None:
    """20 reads acknowledged one after another while the connection is stalled:
    each ack returns at once (before, each waited for its own LREM round trip, so
    the first blocked until Redis answered); once Redis answers the LREMs land and
    the processing list is empty before close."""
    key = f"it:{unique}:list-acks"
    await _fill(r, key, 200)
    proxy = await tcp_proxy(*redis_address)
    source = await _source(proxy, key, socket_timeout=10.0)
    processing = source._processing
    try:
        batches = await collect_batches(source, 200, 10, max_messages=10)
        assert len(batches) == 20 and sum(len(b.messages) for b in batches) == 200
        assert await r.llen(processing) == 200
        proxy.stall()
        for batch in batches:
            started = time.monotonic()
            await asyncio.wait_for(batch.ack.ack(), 0.5)
            assert time.monotonic() - started < 0.2
        await asyncio.sleep(0.5)
        assert await r.llen(processing) == 200  # nothing could reach Redis yet
        proxy.resume()
        await asyncio.wait_for(source._acks.sent(), 5 + SLACK)
        assert await r.llen(processing) == 0
        assert await r.llen(key) == 0
    finally:
        proxy.resume()
        await source.close()
    assert not await r.exists(processing)


async def test_an_lrem_that_times_out_is_logged_and_what_it_left_comes_back_at_restart(
        tcp_proxy: Any, redis_address: tuple[str, int], r: aioredis.Redis,
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    """The connection stalls for longer than the socket timeout: the ack still
    returns at once, the LREM behind it gives up within the timeout and says so,
    and whatever it did not remove is in the processing list, which the next start
    of the same consumer puts back in the queue (at least once, nothing lost)."""
    timeout = 1.0
    key = f"it:{unique}:list-ack-fails"
    await _fill(r, key, 50)
    proxy = await tcp_proxy(*redis_address)
    source = await _source(proxy, key, socket_timeout=timeout)
    processing = source._processing
    try:
        batch = (await collect_batches(source, 50, 10, max_messages=50))[0]
        assert len(batch.messages) == 50
        proxy.stall()
        started = time.monotonic()
        await asyncio.wait_for(batch.ack.ack(), 0.5)
        await asyncio.wait_for(source._acks.sent(), timeout + 10)
        assert time.monotonic() - started < timeout + SLACK
        assert "LREM of 50 element(s)" in caplog.text and "failed" in caplog.text
    finally:
        proxy.resume()
        await source.close()
    # The stalled pipeline may still have reached Redis on resume (then all 50 are
    # gone, as acknowledged), or not (then all 50 are still ours to give back).
    left = await r.llen(processing)
    assert left in (0, 50)
    again = await _source(proxy, key, socket_timeout=timeout)
    try:
        assert await r.llen(processing) == 0
        assert await r.llen(key) == left
        if left:
            back = await collect_batches(again, left, 10, max_messages=50)
            assert sorted(m.data for b in back for m in b.messages) == sorted(
                m.data for m in batch.messages)
    finally:
        await again.close()
