"""The seven Redis plugins against the conformance kit, on the real Redis
(``scripts/services start redis``).

Every test gets its own keys (``conf:<unique>:…``), deleted afterwards. The
test's own legs (``produce``, ``fetch``) use redis-py directly, never the
plugins' code, so a plugin cannot pass by agreeing with itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from natsconn_redis.kv_sink import RedisKvSink
from natsconn_redis.list_sink import RedisListSink
from natsconn_redis.list_source import RedisListSource
from natsconn_redis.pubsub_sink import RedisPubSubSink
from natsconn_redis.pubsub_source import RedisPubSubSource
from natsconn_redis.stream_sink import RedisStreamSink
from natsconn_redis.stream_source import RedisStreamSource

from connector import Message
from connector.testing.kit import SinkSuite, SourceSuite
from connector.testing.servers import host_port

MAX_BYTES = 1024 * 1024  # max_message_bytes given to every sink here

Produce = Callable[[list[Message]], Awaitable[None]]
Fetch = Callable[[int, float], Awaitable[list[Message]]]


@pytest.fixture
def server_address(redis_url: str) -> str:
    host, port = host_port("redis", redis_url)
    return f"{host}:{port}"


def _at(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"host": host, "port": int(port)}


@pytest.fixture
async def r(redis_url: str, unique: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client straight to the server; removes the test's keys afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    keys = [k async for k in client.scan_iter(match=f"conf:{unique}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _entry(fields: dict[bytes, bytes]) -> Message:
    """A stream entry as the documented field mapping says (independent of the plugin)."""
    fields = dict(fields)
    data = fields.pop(b"data", b"")
    subject = fields.pop(b"subject", None)
    key = fields.pop(b"key", None)
    headers = {k.decode(): v.decode() for k, v in fields.items()}
    return Message(data, subject.decode() if subject else None, key, headers)


async def _poll(read: Callable[[], Awaitable[list[Message]]], count: int,
                timeout: float) -> list[Message]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got = await read()
    while len(got) < count and loop.time() < deadline:
        await asyncio.sleep(0.05)
        got = await read()
    return got


# ---------------------------------------------------------------------- sources


class TestRedisStreamSource(SourceSuite):
    redelivery_wait = 5.0  # min_idle_time 1 s, claim_interval 0.3 s
    keeps_key = True
    keeps_order = True

    @pytest.fixture
    def make_source(self, server_address: str, unique: str
                    ) -> Callable[[str | None], RedisStreamSource]:
        def make(address: str | None = None) -> RedisStreamSource:
            return RedisStreamSource.make_test_instance(
                **_at(address or server_address), streams=[f"conf:{unique}:in"],
                group=f"g-{unique}", consumer="c1", min_idle_time=1.0, claim_interval=0.3)
        return make

    @pytest.fixture
    def produce(self, r: aioredis.Redis, unique: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            pipe = r.pipeline(transaction=False)
            for m in messages:
                fields: dict[str | bytes, bytes | str] = {"data": m.data}
                if m.key is not None:
                    fields["key"] = m.key
                fields.update(m.headers)
                pipe.xadd(f"conf:{unique}:in", fields)  # type: ignore[arg-type]
            await pipe.execute()
        return produce


class TestRedisListSource(SourceSuite):
    keeps_headers = False
    keeps_order = True
    gives_ids = False  # list elements have no identity

    @pytest.fixture
    def make_source(self, server_address: str, unique: str
                    ) -> Callable[[str | None], RedisListSource]:
        def make(address: str | None = None) -> RedisListSource:
            return RedisListSource.make_test_instance(
                **_at(address or server_address), key=f"conf:{unique}:queue", consumer="c1")
        return make

    @pytest.fixture
    def produce(self, r: aioredis.Redis, unique: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            if messages:
                await r.lpush(f"conf:{unique}:queue", *[m.data for m in messages])
        return produce


class TestRedisPubSubSource(SourceSuite):
    at_least_once = False
    keeps_headers = False
    keeps_order = True

    @pytest.fixture
    def make_source(self, server_address: str, unique: str
                    ) -> Callable[[str | None], RedisPubSubSource]:
        def make(address: str | None = None) -> RedisPubSubSource:
            return RedisPubSubSource.make_test_instance(
                **_at(address or server_address), channels=[f"conf:{unique}:ch"],
                patterns=[f"conf:{unique}:p:*"], ping_interval=1.0, socket_timeout=3.0)
        return make

    @pytest.fixture
    def produce(self, r: aioredis.Redis, unique: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            pipe = r.pipeline(transaction=False)
            for i, m in enumerate(messages):
                # half on the channel, half through the pattern: both must arrive
                target = f"conf:{unique}:ch" if i % 2 == 0 else f"conf:{unique}:p:x"
                pipe.publish(target, m.data)
            await pipe.execute()
        return produce


# ---------------------------------------------------------------------- sinks


class TestRedisStreamSink(SinkSuite):
    keeps_key = True
    keeps_order = True
    max_message_bytes = MAX_BYTES

    @pytest.fixture
    def make_sink(self, server_address: str, unique: str
                  ) -> Callable[[str | None], RedisStreamSink]:
        def make(address: str | None = None) -> RedisStreamSink:
            return RedisStreamSink.make_test_instance(
                **_at(address or server_address), stream=f"conf:{unique}:out",
                max_message_bytes=MAX_BYTES)
        return make

    @pytest.fixture
    def fetch(self, r: aioredis.Redis, unique: str) -> Fetch:
        async def read() -> list[Message]:
            entries: Any = await r.xrange(f"conf:{unique}:out")
            return [_entry(fields) for _, fields in entries]

        async def fetch(count: int, timeout: float) -> list[Message]:
            return await _poll(read, count, timeout)
        return fetch


class TestRedisListSink(SinkSuite):
    keeps_headers = False
    keeps_order = True
    max_message_bytes = MAX_BYTES

    @pytest.fixture
    def make_sink(self, server_address: str, unique: str
                  ) -> Callable[[str | None], RedisListSink]:
        def make(address: str | None = None) -> RedisListSink:
            return RedisListSink.make_test_instance(
                **_at(address or server_address), key=f"conf:{unique}:list",
                max_message_bytes=MAX_BYTES)
        return make

    @pytest.fixture
    def fetch(self, r: aioredis.Redis, unique: str) -> Fetch:
        async def read() -> list[Message]:
            values: Any = await r.lrange(f"conf:{unique}:list", 0, -1)
            return [Message(v) for v in reversed(values)]  # LPUSH: oldest at the tail

        async def fetch(count: int, timeout: float) -> list[Message]:
            return await _poll(read, count, timeout)
        return fetch


class TestRedisPubSubSink(SinkSuite):
    keeps_headers = False
    keeps_order = True
    max_message_bytes = MAX_BYTES

    @pytest.fixture
    def make_sink(self, server_address: str, unique: str
                  ) -> Callable[[str | None], RedisPubSubSink]:
        def make(address: str | None = None) -> RedisPubSubSink:
            return RedisPubSubSink.make_test_instance(
                **_at(address or server_address), channel=f"conf:{unique}:ch",
                max_message_bytes=MAX_BYTES)
        return make

    @pytest.fixture
    async def fetch(self, r: aioredis.Redis, unique: str) -> AsyncIterator[Fetch]:
        """Subscribed before the test writes anything (pub/sub keeps nothing)."""
        pubsub = r.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(f"conf:{unique}:ch")
        while await pubsub.get_message(timeout=1.0) is None and not pubsub.subscribed:
            pass
        got: list[Message] = []

        async def fetch(count: int, timeout: float) -> list[Message]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while len(got) < count and loop.time() < deadline:
                reply = await pubsub.get_message(ignore_subscribe_messages=True,
                                                 timeout=min(0.5, deadline - loop.time()))
                if reply is not None and reply["type"] == "message":
                    got.append(Message(reply["data"]))
            # a short look for anything beyond count (duplicates would show)
            while True:
                reply = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if reply is None:
                    break
                if reply["type"] == "message":
                    got.append(Message(reply["data"]))
            return list(got)
        yield fetch
        await pubsub.aclose()  # type: ignore[no-untyped-call]


class TestRedisKvSinkSet(SinkSuite):
    """SET, one key per message id: a rewrite replaces, so it dedupes by id."""

    keeps_headers = False
    dedupes_by_id = True
    max_message_bytes = MAX_BYTES

    @pytest.fixture
    def make_sink(self, server_address: str, unique: str
                  ) -> Callable[[str | None], RedisKvSink]:
        def make(address: str | None = None) -> RedisKvSink:
            return RedisKvSink.make_test_instance(
                **_at(address or server_address), key=f"conf:{unique}:kv:{{id}}", ttl="10m",
                max_message_bytes=MAX_BYTES)
        return make

    @pytest.fixture
    def fetch(self, r: aioredis.Redis, unique: str) -> Fetch:
        async def read() -> list[Message]:
            keys = [k async for k in r.scan_iter(match=f"conf:{unique}:kv:*", count=1000)]
            if not keys:
                return []
            for k in keys:
                ttl = await r.pttl(k)
                assert 0 < ttl <= 600_000, f"{k!r} has no TTL of at most 10m ({ttl} ms)"
            found: Any = await r.mget(keys)
            return [Message(v) for v in found if v is not None]

        async def fetch(count: int, timeout: float) -> list[Message]:
            return await _poll(read, count, timeout)
        return fetch


class TestRedisKvSinkHset(SinkSuite):
    """HSET into one hash, one field per message id."""

    keeps_headers = False
    dedupes_by_id = True
    max_message_bytes = MAX_BYTES

    @pytest.fixture
    def make_sink(self, server_address: str, unique: str
                  ) -> Callable[[str | None], RedisKvSink]:
        def make(address: str | None = None) -> RedisKvSink:
            return RedisKvSink.make_test_instance(
                **_at(address or server_address), key=f"conf:{unique}:hash", command="hset",
                field="{id}", max_message_bytes=MAX_BYTES)
        return make

    @pytest.fixture
    def fetch(self, r: aioredis.Redis, unique: str) -> Fetch:
        async def read() -> list[Message]:
            values: Any = await r.hgetall(f"conf:{unique}:hash")
            return [Message(v) for v in values.values()]

        async def fetch(count: int, timeout: float) -> list[Message]:
            return await _poll(read, count, timeout)
        return fetch
