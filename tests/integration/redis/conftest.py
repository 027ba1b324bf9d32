"""Fixtures of the Redis integration tests: a raw redis-py client for the
test's own legs, and the server's address. Every key a test makes starts with
``it:<unique>:`` and is deleted afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from connector.testing.servers import host_port


@pytest.fixture
def redis_address(redis_url: str) -> tuple[str, int]:
    return host_port("redis", redis_url)


@pytest.fixture
async def r(redis_url: str, unique: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    yield client
    keys = [k async for k in client.scan_iter(match=f"it:{unique}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
