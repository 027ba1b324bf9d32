"""A Redis that stops answering (``TcpProxy.stall()``: the connection stays open,
no byte goes through). The plugins' clients keep no timeout per reply; each
round trip has one deadline (``socket_timeout``, plus the block time of a
blocking read). These tests show that the deadline is kept, that it fails the
operation as retryable, that the connection it hit is dropped rather than read
on half-way (the next replies belong to the next commands), and that nothing is
lost once the server answers again."""

from __future__ import annotations

import asyncio
import builtins
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from natsconn_redis.connection import command_error
from natsconn_redis.stream_sink import RedisStreamSink
from natsconn_redis.stream_source import RedisStreamSource

from connector import Message, RetryableError
from connector.testing.kit import collect
from connector.testing.proxy import TcpProxy

from ..helpers import (
    assert_all_present,
    local_metric,
    pipeline_file,
    run_in_process,
    seq_of,
    wait_until,
)
from .redis_helpers import fill_stream, pending

pytestmark = pytest.mark.integration

TIMEOUT = 1.0  # socket_timeout of the plugins under test
SLACK = 3.0  # scheduling on a busy 2-core machine; far below "never"


def _via(proxy: TcpProxy) -> dict[str, Any]:
    return {"host": proxy.host, "port": proxy.port, "socket_timeout": TIMEOUT}


def _batch(first: int, n: int) -> list[Message]:
    return [Message(b"%d" % i, "s") for i in range(first, first + n)]


async def _retry(write: Any, limit: float = 15.0) -> None:
    """What the engine does with a retryable failure: try again until it works."""
    deadline = time.monotonic() + limit
    while True:
        try:
            await write()
            return
        except RetryableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_a_builtin_timeout_is_mapped_as_redis_timeout() -> None:
    """asyncio.timeout raises the builtin TimeoutError; wherever one escapes it is
    retryable, as redis' own TimeoutError is."""
    for exc in (builtins.TimeoutError(), redis.exceptions.TimeoutError("t")):
        assert isinstance(command_error(exc), RetryableError), exc


async def test_stalled_server_fails_a_write_within_the_timeout_and_recovers(
        tcp_proxy: Any, redis_address: tuple[str, int], r: aioredis.Redis,
        unique: str) -> None:
    stream = f"it:{unique}:stall-sink"
    proxy = await tcp_proxy(*redis_address)
    sink = RedisStreamSink.make_test_instance(**_via(proxy), stream=stream)
    await sink.connect()
    try:
        await sink.write_batch(_batch(0, 100))
        accepted = proxy.accepted
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(RetryableError, match="within 1s"):
            await asyncio.wait_for(sink.write_batch(_batch(100, 100)), TIMEOUT + 10)
        took = time.monotonic() - started
        assert TIMEOUT * 0.9 <= took < TIMEOUT + SLACK, took
        proxy.resume()
        await _retry(lambda: sink.write_batch(_batch(100, 100)))
        await sink.write_batch(_batch(200, 100))
        # The timed-out connection was dropped, not reused: a new one was made.
        assert proxy.accepted > accepted
    finally:
        await sink.close()
    entries: Any = await r.xrange(stream)
    seqs = [int(f[b"data"]) for _, f in entries]
    assert_all_present(seqs, 300, stream)
    # Only the batch that timed out may be there twice (at least once).
    assert len(seqs) - len(set(seqs)) <= 100
    assert all(100 <= s < 200 for s in seqs if seqs.count(s) > 1)


async def test_stalled_server_fails_reads_and_acks_then_nothing_is_lost(
        tcp_proxy: Any, redis_address: tuple[str, int], r: aioredis.Redis,
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    """A blocking read may take its block time plus the timeout, no more; an ack
    returns at once and the XACK behind it gives up within the timeout, saying
    so; afterwards the replies are the right ones (a desynchronised connection
    would hand one command the reply of another) and every entry arrives, with
    nothing left pending."""
    stream = f"it:{unique}:stall-src"
    await fill_stream(r, stream, 300)
    proxy = await tcp_proxy(*redis_address)
    source = RedisStreamSource.make_test_instance(
        **_via(proxy), streams=[stream], group="g", consumer="c1", min_idle_time=0.5,
        claim_interval=0.5)
    await source.connect()
    got: list[Message] = []
    try:
        first = await source.read_batch(100, 0.1)
        assert first is not None and len(first) == 100
        got += first.messages
        proxy.stall()
        started = time.monotonic()
        await asyncio.wait_for(first.ack.ack(), 1.0)  # queued for the next XACK
        await asyncio.wait_for(source._acks.sent(), TIMEOUT + 10)
        assert time.monotonic() - started < TIMEOUT + SLACK
        assert "XACK of 100 entries failed" in caplog.text
        block = 0.5
        started = time.monotonic()
        with pytest.raises(RetryableError):
            await asyncio.wait_for(source.read_batch(100, block), TIMEOUT + block + 10)
        took = time.monotonic() - started
        assert TIMEOUT * 0.9 <= took < TIMEOUT + block + SLACK, took
        proxy.resume()
        # The first batch comes back unless its XACK reached Redis after all (the
        # proxy forwards what it held once resumed): read until all 300 were seen.
        deadline = time.monotonic() + 20
        while len({seq_of(m.data) for m in got}) < 300 and time.monotonic() < deadline:
            got += await collect(source, 1, 1.0, max_messages=100)
        got += await collect(source, 1, 1.0)  # and nothing more stays pending
    finally:
        await source.close()
    assert_all_present([seq_of(m.data) for m in got], 300, stream)
    assert await pending(r, stream, "g") == 0


async def test_pipeline_rides_out_a_stalled_sink(
        tcp_proxy: Any, redis_address: tuple[str, int], r: aioredis.Redis,
        unique: str, tmp_path: Path) -> None:
    """generate → redis_stream through a proxy stalled for a few timeouts: the
    engine retries the timed-out writes and every message ends in the stream."""
    n = 3000
    stream = f"it:{unique}:stall-pipe"
    proxy = await tcp_proxy(*redis_address)
    pipeline = f"stall-{unique}"
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "generate", "count": n, "rate": 1500, "size": 32},
        "sink": {"type": "redis_stream", "stream": stream, **_via(proxy)},
        "batch": {"max_messages": 100, "max_wait": "20ms"},
        "retry": {"initial_backoff": "100ms", "max_backoff": "500ms"},
    }])
    async with run_in_process(file):
        await wait_until(lambda: _has_some(r, stream), 20, "the first entries")
        proxy.stall()
        await wait_until(lambda: local_metric("natsconn_retries_total", pipeline) > 0,
                         TIMEOUT + SLACK + 5, "a timed-out write retried by the engine")
        stalled_at = await r.xlen(stream)
        proxy.resume()
        await wait_until(lambda: _has_all(r, stream, n), 30, f"{n} distinct entries")
    assert stalled_at < n, "the stall came too late to matter"


async def _has_some(r: aioredis.Redis, stream: str) -> bool:
    return bool(await r.xlen(stream))


async def _has_all(r: aioredis.Redis, stream: str, n: int) -> bool:
    entries: Any = await r.xrange(stream)
    return len({int(f[b"data"][:12]) for _, f in entries}) == n
