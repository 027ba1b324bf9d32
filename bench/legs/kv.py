"""NATS KV: the ``nats_kv`` endpoint (source and sink), raw legs written with
nats-py's KV API, and the pairs ``nats_kv -> jetstream`` and ``jetstream -> nats_kv``.

A place is a fresh bucket (history 1, the run's storage). As a source it is
preloaded with ``count`` distinct keys ``k.<n>``, one put each, so the bucket
holds ``count`` values and a watch of its present values sees every one. As a
sink, the pipeline's ``nats_kv`` sink puts each message under ``{subject}``:
a ``jetstream`` source's messages all carry the stream's one subject (and no
key), so every put goes to that one key; the raw produce legs put to one key
too, so both do the same server work (a put that replaces the key's last
revision). The far side's count is the stream's last sequence (every put is a
revision), not the values it holds.

Raw produce legs (``kv.put`` is a JetStream publish to ``$KV.<bucket>.<key>``
awaiting its PubAck, one round trip per key):

- ``gather``: a batch of ``kv.put`` calls awaited together
  (``asyncio.gather``), ``max_in_flight`` batches outstanding: as far as
  nats-py's KV API pipelines (each put is its own request on the client's
  one response inbox). With ``params.ids`` (the pipeline's sink writes
  ``Nats-Msg-Id``) ``kv.put`` cannot carry headers, so the leg makes the same
  publish ``kv.put`` makes, ``js.publish("$KV.<bucket>.<key>", headers=...)``.
- ``one_at_a_time``: ``await kv.put()`` per key, for reference.

Raw consume legs (each reads the ``count`` preloaded values):

- ``watchall``: nats-py's ``kv.watchall()`` (an ordered push consumer, last
  value per key, flow control, no acks), entries read from ``updates()``;
- ``push``: the jetstream raw push leg on the bucket's stream ``KV_<bucket>``
  (a durable push consumer to a callback, ``+ACK`` per message);
- ``pull``: the jetstream raw pull leg on that stream (durable pull consumer,
  requests ahead of need, ``+ACK`` per message): what the ``nats_kv`` source
  does underneath.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable
from typing import Any

from nats.js import api

from ..endpoint import Ready, Stopwatch
from ..model import Params, Place, Sample
from ..registry import Pair, endpoint, pair
from .nats import JetStream, _NatsBase, connect, payloads

_NOT_IN_BUCKET_NAME = re.compile(r"[^A-Za-z0-9_-]")
SINK_KEY = "bench.kv"  # the one key the sink's raw legs put to


def bucket_name(tag: str, role: str) -> str:
    """A bucket name (letters, digits, ``-`` and ``_`` only) for one run's place."""
    return _NOT_IN_BUCKET_NAME.sub("_", f"BENCH_{tag}_{role}").upper()


def key_of(place: Place, seq: int) -> str:
    """The key of the ``seq``-th put: distinct keys in a source's place, the one
    key of a sink's place."""
    one = place.get("key")
    return one if one else f"k.{seq}"


def batches(count: int, size: int) -> list[tuple[int, int]]:
    """``(first, length)`` of each batch of ``count`` puts, ``size`` at most each."""
    size = max(size, 1)
    return [(first, min(size, count - first)) for first in range(0, count, size)]


@endpoint
class NatsKv(_NatsBase):
    """A KV bucket (stream ``KV_<bucket>``): read through a durable, written with puts."""

    name = "nats_kv"
    durable = True
    gives_ids = True  # <bucket>:<revision>
    uses_ids = True  # Nats-Msg-Id (the sink's dedupe option is on by default)
    ids_label = "with Nats-Msg-Id"
    produce_legs = {
        "gather": "a batch of kv.put() awaited together (asyncio.gather), max_in_flight "
                  "batches outstanding",
        "one_at_a_time": "await kv.put() per key",
    }
    consume_legs = {
        "watchall": "kv.watchall(): ordered push consumer, last value per key, no acks",
        "push": "durable push consumer on KV_<bucket> to a callback, +ACK per message",
        "pull": "durable pull consumer on KV_<bucket>, requests ahead of need, +ACK per "
                "message",
    }
    feed_technique = "gather"

    async def create(self, tag: str, params: Params, role: str) -> Place:
        bucket = bucket_name(tag, role)
        storage = api.StorageType.MEMORY if params.storage == "memory" else api.StorageType.FILE
        await self.nc.jetstream().create_key_value(bucket=bucket, history=1, storage=storage)
        place: Place = {"bucket": bucket, "stream": f"KV_{bucket}", "durable": f"bench-{tag}"}
        if role == "sink":
            place["key"] = SINK_KEY
        return place

    async def destroy(self, place: Place) -> None:
        with contextlib.suppress(Exception):  # already gone
            await self.nc.jetstream().delete_key_value(place["bucket"])

    async def delivered(self, place: Place) -> int:
        info = await self.nc.jetstream().stream_info(place["stream"])
        return int(info.state.last_seq)

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "nats_kv", "servers": [self.url], "bucket": place["bucket"],
                "durable": place["durable"], "prefetch": params.prefetch,
                "prefetch_bytes": params.prefetch_bytes}

    def sink_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "nats_kv", "servers": [self.url], "bucket": place["bucket"],
                "key": "{subject}"}

    # ---- raw legs

    async def produce_gather(self, place: Place, params: Params) -> Sample:
        nc = await connect(self.env, "bench-kv-produce")
        js = nc.jetstream()
        kv = await js.key_value(place["bucket"])
        data = payloads(params)
        prefix = f"$KV.{place['bucket']}."
        id_prefix = f"{place['stream']}:" if params.ids else None
        slots = asyncio.Semaphore(params.max_in_flight)
        errors = 0

        def value(seq: int) -> bytes:
            return data[seq] if isinstance(data, list) else data

        async def one_batch(first: int, k: int) -> None:
            nonlocal errors
            try:
                puts: list[Awaitable[object]]
                if id_prefix is None:
                    puts = [kv.put(key_of(place, s), value(s)) for s in range(first, first + k)]
                else:
                    puts = [js.publish(prefix + key_of(place, s), value(s),
                                       headers={"Nats-Msg-Id": f"{id_prefix}{s}"})
                            for s in range(first, first + k)]
                results = await asyncio.gather(*puts, return_exceptions=True)
                errors += sum(isinstance(r, BaseException) for r in results)
            finally:
                slots.release()

        tasks: list[asyncio.Task[None]] = []
        watch = Stopwatch()
        for first, k in batches(params.count, params.batch):
            await slots.acquire()
            tasks.append(asyncio.create_task(one_batch(first, k)))
        await asyncio.gather(*tasks)
        sample = watch.sample(params.count, notes=[f"{errors} put errors"] if errors else [])
        await nc.close()
        return sample

    async def produce_one_at_a_time(self, place: Place, params: Params) -> Sample:
        nc = await connect(self.env, "bench-kv-produce-1")
        js = nc.jetstream()
        kv = await js.key_value(place["bucket"])
        data = payloads(params)
        prefix = f"$KV.{place['bucket']}."
        id_prefix = f"{place['stream']}:" if params.ids else None
        watch = Stopwatch()
        for seq in range(params.count):
            value = data[seq] if isinstance(data, list) else data
            if id_prefix is None:
                await kv.put(key_of(place, seq), value)
            else:
                await js.publish(prefix + key_of(place, seq), value,
                                 headers={"Nats-Msg-Id": f"{id_prefix}{seq}"})
        sample = watch.sample(params.count)
        await nc.close()
        return sample

    async def consume_watchall(self, place: Place, params: Params, ready: Ready) -> Sample:
        nc = await connect(self.env, "bench-kv-watch")
        kv = await nc.jetstream().key_value(place["bucket"])
        await ready()
        n, count = params.count, 0
        watch = Stopwatch()
        watcher = await kv.watchall()
        while count < n:
            entry = await watcher.updates(timeout=30)  # type: ignore[no-untyped-call]
            if entry is not None:
                count += 1
        sample = watch.sample(count)
        await watcher.stop()  # type: ignore[no-untyped-call]
        await nc.close()
        return sample

    async def consume_push(self, place: Place, params: Params, ready: Ready) -> Sample:
        return await JetStream(self.env).consume_push(place, params, ready)

    async def consume_pull(self, place: Place, params: Params, ready: Ready) -> Sample:
        return await JetStream(self.env).consume_pull(place, params, ready)


pair(Pair("nats_kv", "jetstream", default=False))
pair(Pair("jetstream", "nats_kv", default=False))
