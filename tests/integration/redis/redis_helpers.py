"""Raw redis-py legs for the Redis integration tests: filling a stream or a
list with ``{"seq": N}`` payloads (pipelined), and the group's pending count."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from ..helpers import payload


def at(address: tuple[str, int]) -> dict[str, Any]:
    """Plugin options for a server address."""
    return {"host": address[0], "port": address[1]}


async def fill_stream(r: aioredis.Redis, stream: str, count: int, *, start: int = 0,
                      chunk: int = 5000, extra: dict[str, str] | None = None) -> None:
    for first in range(start, start + count, chunk):
        pipe = r.pipeline(transaction=False)
        for i in range(first, min(first + chunk, start + count)):
            fields: dict[Any, Any] = {"data": payload(i)}
            if extra:
                fields.update(extra)
            pipe.xadd(stream, fields)
        await pipe.execute()


async def fill_list(r: aioredis.Redis, key: str, count: int, *, chunk: int = 5000) -> None:
    for first in range(0, count, chunk):
        await r.lpush(key, *[payload(i) for i in range(first, min(first + chunk, count))])


async def pending(r: aioredis.Redis, stream: str, group: str) -> int:
    """Entries delivered to the group and not acknowledged (XPENDING summary)."""
    summary: Any = await r.xpending(stream, group)
    return int(summary["pending"])


async def pending_by_consumer(r: aioredis.Redis, stream: str, group: str) -> dict[str, int]:
    summary: Any = await r.xpending(stream, group)
    return {c["name"].decode(): int(c["pending"]) for c in summary["consumers"] or []}


async def group_lag(r: aioredis.Redis, stream: str, group: str) -> int | None:
    for info in await r.xinfo_groups(stream):
        if info["name"] == group.encode():
            lag = info.get("lag")
            return int(lag) if lag is not None else None
    raise AssertionError(f"no group {group} on {stream}")
