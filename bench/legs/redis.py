"""Redis streams: the ``redis_stream`` endpoint, raw redis-py legs, and its pairs.

Raw legs use redis-py's asyncio client (hiredis parser, RESP2, bytes replies:
what the plugins use) the fastest way we know:

- produce: a batch's XADDs in one pipeline (``transaction=False``: no
  MULTI/EXEC), one round trip per batch, ``max_in_flight`` pipelines
  outstanding on their own pooled connections; commands packed by hiredis
  and one timeout per round trip rather than redis-py's per-reply one (see
  ``_client``). Each entry has the fields the
  ``redis_stream`` sink writes for a message without key or headers: ``data``
  and ``subject``.
- consume: XREADGROUP with COUNT = batch (no BLOCK while entries are there);
  the batch's ids acknowledged with one XACK, sent in the same pipeline as
  the next XREADGROUP, so reading on costs one round trip per batch and
  every entry is acknowledged (the last XACK inside the timed window).

The far side of a pipeline is counted with XLEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
from collections.abc import Iterable
from typing import Any

import hiredis
from redis.asyncio import Connection, Redis

from ..endpoint import Endpoint, Ready, Stopwatch
from ..model import Params, Place, Sample
from ..registry import Pair, endpoint, pair

DEFAULT_URL = "redis://127.0.0.1:6379/0"
IDLE_END = 3.0  # a consume leg gives up this long after the stream ran dry
ROUND_TRIP = 10.0  # longest wait for one pipeline's replies (the plugins' socket_timeout)


class _HiredisPacking(Connection):
    """Commands packed by hiredis (C), as redis-py's sync client does; its asyncio
    connection packs in Python, about half the CPU of a pipelined XADD."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "XGROUP CREATE" and the like
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(part for c in commands for part in self.pack_command(*c))]


def _client(url: str, name: str, connections: int = 8) -> Redis:
    """hiredis packing, and no per-read timeout (``socket_timeout=None``):
    redis-py would enter an ``asyncio.timeout()`` for every reply of a
    pipeline, about a third of the client's CPU for a pipelined XADD; each
    round trip gets one ``ROUND_TRIP`` timeout instead (a timed-out read drops
    its connection, so nothing desyncs)."""
    client = Redis.from_url(url, client_name=name, decode_responses=False, protocol=2,
                            max_connections=connections, socket_timeout=None,
                            socket_connect_timeout=5)
    client.connection_pool.connection_class = _HiredisPacking
    return client


@endpoint
class RedisStream(Endpoint):
    """A Redis stream; the source reads it through a fresh consumer group."""

    name = "redis_stream"
    system = "redis"
    address_env = "REDIS_URL"
    default_url = DEFAULT_URL
    durable = True
    gives_ids = True  # <stream>:<entry id>
    uses_ids = False  # the sink writes ids only with id_field
    produce_legs = {"pipelined": "a batch's XADDs in one pipeline (transaction=False), one "
                    "round trip per batch, max_in_flight pipelines outstanding; hiredis "
                    "packing, one timeout per round trip (socket_timeout None)"}
    consume_legs = {"xreadgroup": "XREADGROUP COUNT batch; the batch's XACK pipelined "
                    "with the next XREADGROUP (one round trip per batch)"}
    feed_technique = "pipelined"

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.url = env.get("REDIS_URL", DEFAULT_URL)
        self._r: Redis | None = None
        self._version = "?"

    # ---- harness side

    async def open(self) -> None:
        self._r = _client(self.url, "bench-admin", 2)
        info = await self._r.info("server")
        self._version = str(info.get("redis_version", "?"))

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()

    @property
    def r(self) -> Redis:
        assert self._r is not None, "open() first"
        return self._r

    async def create(self, tag: str, params: Params, role: str) -> Place:
        # The sink and the source create the stream themselves (XADD, MKSTREAM).
        return {"stream": f"bench:{tag}:{role}", "group": f"bench-{tag}",
                "subject": f"bench.{tag}.{role}"}

    async def destroy(self, place: Place) -> None:
        with contextlib.suppress(Exception):
            await self.r.delete(place["stream"])

    async def delivered(self, place: Place) -> int:
        return int(await self.r.xlen(place["stream"]))

    async def backlog(self, place: Place) -> dict[str, int]:
        try:
            groups = await self.r.xinfo_groups(place["stream"])
        except Exception:  # no stream or group yet
            return {}
        for g in groups:
            name = g.get("name")
            if name in (place["group"], place["group"].encode()):
                return {"lag": int(g.get("lag") or 0), "pending": int(g.get("pending") or 0)}
        return {}

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "redis_stream", "url": self.url, "streams": [place["stream"]],
                "group": place["group"]}

    def sink_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "redis_stream", "url": self.url, "stream": place["stream"]}

    def describe(self) -> dict[str, str]:
        return {"redis-server": self._version, "redis-py": importlib.metadata.version("redis"),
                "hiredis": importlib.metadata.version("hiredis"),
                "redis_entries": "fields data and subject (no key, no headers)"}

    # ---- raw legs

    async def produce_pipelined(self, place: Place, params: Params) -> Sample:
        r = _client(self.url, "bench-redis-produce", params.max_in_flight)
        await r.ping()
        stream, data = place["stream"], os.urandom(params.size)
        subject = place["subject"]
        slots = asyncio.Semaphore(params.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        errors: list[str] = []

        async def send(k: int) -> None:
            try:
                pipe = r.pipeline(transaction=False)
                command = pipe.execute_command
                for _ in range(k):
                    command("XADD", stream, "*", "data", data, "subject", subject)
                async with asyncio.timeout(ROUND_TRIP):
                    replies = await pipe.execute(raise_on_error=False)
                for reply in replies:
                    if isinstance(reply, Exception):
                        errors.append(str(reply))
            finally:
                slots.release()

        # Warm the pool: every connection open before the clock starts.
        await asyncio.gather(*(r.ping() for _ in range(params.max_in_flight)))
        watch = Stopwatch()
        sent = 0
        while sent < params.count:
            k = min(params.batch, params.count - sent)
            await slots.acquire()
            task = asyncio.create_task(send(k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += k
        if tasks:
            await asyncio.gather(*tasks)
        sample = watch.sample(sent, notes=[f"{len(errors)} XADD errors, first: {errors[0]}"]
                              if errors else [])
        await r.aclose()
        return sample

    async def consume_xreadgroup(self, place: Place, params: Params, ready: Ready) -> Sample:
        r = _client(self.url, "bench-redis-consume", 2)
        stream, group = place["stream"], place["group"]
        await r.xgroup_create(stream, group, id="0", mkstream=True)
        read = ("XREADGROUP", "GROUP", group, "bench", "COUNT", params.batch,
                "STREAMS", stream, ">")
        await ready()
        n = params.count
        count = 0
        ids: list[bytes] = []
        loop = asyncio.get_running_loop()
        dry_since: float | None = None
        watch = Stopwatch()
        while count < n:
            pipe = r.pipeline(transaction=False)
            if ids:
                pipe.execute_command("XACK", stream, group, *ids)
            pipe.execute_command(*read)
            async with asyncio.timeout(ROUND_TRIP):
                replies = await pipe.execute()
            reply: Any = replies[-1]
            ids = [entry_id for _, entries in reply or () for entry_id, _ in entries]
            count += len(ids)
            if ids:
                dry_since = None
            elif dry_since is None:
                dry_since = loop.time()
            elif loop.time() - dry_since > IDLE_END:
                break
        if ids:
            await r.execute_command("XACK", stream, group, *ids)  # type: ignore[no-untyped-call]
        sample = watch.sample(count, notes=[] if count >= n else [f"only {count} of {n} read"])
        pending = await r.xpending(stream, group)
        if pending and pending.get("pending"):
            sample.notes.append(f"{pending['pending']} entries left pending")
        await r.aclose()
        return sample


# core NATS / JetStream <-> Redis streams (those endpoints are in legs/nats.py)
pair(Pair("nats", "redis_stream"))
pair(Pair("redis_stream", "nats"))
pair(Pair("jetstream", "redis_stream", default=False))
