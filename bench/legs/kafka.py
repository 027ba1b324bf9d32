"""Kafka: the ``kafka`` endpoint (topic per run), raw aiokafka legs, and its pairs.

Raw legs use aiokafka's public API the fastest way we know, with the same
client settings as the natsconn plugins' defaults, so that the comparison is
about how the work is driven, not how the client is tuned:

- produce: an idempotent producer with ``acks=all`` (the sink's defaults),
  linger 5 ms and 512 KiB record batches, ``max_in_flight`` batches
  outstanding, no keys. Two ways to hand a batch over: ``send_gather`` calls
  ``send()`` for every message at once (it appends to the partition's record
  batch and returns a future; the producer spreads keyless records over the
  partitions), then one ``gather``; ``send_batch`` splits the batch evenly
  over the partitions and builds each part's record batch itself
  (``create_batch()``, ``append()``, ``send_batch()``), a few futures per
  batch instead of one per message and no per-message coroutine.
- consume: a consumer group member reading with ``getmany(max_records=batch)``
  (the source's fetch sizes and isolation level), committing its positions by
  hand, the last commit inside the timed window. Two cadences: after every
  batch (``commit_each``), and once a second (``commit_1s``, the source's
  ``commit_interval``). A commit costs a few milliseconds during which the
  broker serves no fetch on the same connection (one request at a time per
  connection), so committing every batch caps the rate near 130k msg/s here;
  the table compares against the faster leg.

The far side of a pipeline is counted with the topic's end offsets (one
ListOffsets request), which an idempotent, non-transactional producer moves by
exactly one per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from ..endpoint import Endpoint, Ready, Stopwatch
from ..model import Params, Place, Sample
from ..registry import Pair, endpoint, pair

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
PARTITIONS = 3  # the local broker's num.partitions
# The kafka sink's defaults (plugins/natsconn_kafka/sink.py).
LINGER_MS = 5
MAX_BATCH_SIZE = 512 * 1024
MAX_REQUEST_SIZE = 1024 * 1024
# The kafka source's defaults (plugins/natsconn_kafka/source.py).
FETCH_MAX_BYTES = 16 * 1024 * 1024
MAX_PARTITION_FETCH_BYTES = 1024 * 1024
FETCH_MAX_WAIT_MS = 500
ISOLATION = "read_committed"
COMMIT_INTERVAL = 1.0  # the source's commit_interval default
IDLE_END = 30  # empty one-second fetches in a row after which a consume leg gives up


def _producer(bootstrap: str, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, client_id=client_id, acks="all",
        enable_idempotence=True, linger_ms=LINGER_MS, max_batch_size=MAX_BATCH_SIZE,
        max_request_size=MAX_REQUEST_SIZE)


@endpoint
class Kafka(Endpoint):
    """A Kafka topic of ``PARTITIONS`` partitions; the source reads it in a fresh group."""

    name = "kafka"
    system = "kafka"
    durable = True
    group_shared = True
    gives_ids = True  # topic/partition/offset
    uses_ids = False  # the sink writes ids only with metadata_headers
    produce_legs = {
        "send_gather": "idempotent producer, acks=all, linger 5ms: a batch's send()s at "
                       "once, one gather per batch, max_in_flight batches outstanding",
        "send_batch": "same producer; a batch split evenly over the partitions, each part "
                      "built with create_batch()/append() and sent with send_batch(); "
                      "max_in_flight batches outstanding",
    }
    consume_legs = {
        "commit_each": "consumer group, getmany(max_records=batch), commit() after every "
                       "batch",
        "commit_1s": "consumer group, getmany(max_records=batch), commit() once a second "
                     "and at the end (the source's commit_interval)",
    }
    feed_technique = "send_batch"

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.bootstrap = env.get("KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP)
        self._admin: AIOKafkaAdminClient | None = None
        # Per topic: a consumer without a group that only asks for end offsets. One per
        # topic, stopped with it: a client keeps refreshing the metadata of every topic
        # it was asked about, and logs an error for each one deleted since.
        self._counters: dict[str, AIOKafkaConsumer] = {}

    # ---- harness side

    async def open(self) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap,
                                          client_id="bench-admin")
        await self._admin.start()

    async def close(self) -> None:
        for counter in self._counters.values():
            await counter.stop()
        if self._admin is not None:
            await self._admin.close()

    @property
    def admin(self) -> AIOKafkaAdminClient:
        assert self._admin is not None, "open() first"
        return self._admin

    async def create(self, tag: str, params: Params, role: str) -> Place:
        topic = f"bench-{tag}-{role}"
        await self.admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        # Wait until every partition has a leader, so no leg starts on a metadata retry.
        for _ in range(200):
            described = await self.admin.describe_topics([topic])
            parts = described[0].get("partitions") or [] if described else []
            if len(parts) == PARTITIONS and all(p.get("leader", -1) >= 0 for p in parts):
                break
            await asyncio.sleep(0.05)
        return {"topic": topic, "partitions": PARTITIONS, "group": f"bench-{tag}"}

    async def destroy(self, place: Place) -> None:
        counter = self._counters.pop(place["topic"], None)
        if counter is not None:
            await counter.stop()
        with contextlib.suppress(KafkaError, OSError):
            await self.admin.delete_topics([place["topic"]])

    async def delivered(self, place: Place) -> int:
        topic = place["topic"]
        counter = self._counters.get(topic)
        if counter is None:
            counter = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                       client_id="bench-counter", enable_auto_commit=False)
            await counter.start()
            self._counters[topic] = counter
        tps = [TopicPartition(topic, p) for p in range(place["partitions"])]
        ends = await counter.end_offsets(tps)
        return int(sum(ends.values()))

    async def consuming(self, place: Place) -> bool:
        """The source's group is Stable with a member (partitions assigned)."""
        try:
            groups = await self.admin.describe_consumer_groups([place["group"]])
        except KafkaError:
            return False
        for g in groups:
            for group in getattr(g, "groups", []) or []:
                # (error_code, group_id, state, protocol_type, protocol, members, ...)
                if len(group) > 5 and group[2] == "Stable" and group[5]:
                    return True
        return False

    async def backlog(self, place: Place) -> dict[str, int]:
        """The group's lag: end offsets minus committed offsets, over the partitions."""
        try:
            committed = await self.admin.list_consumer_group_offsets(place["group"])
        except KafkaError:
            return {}
        ends = await self.delivered(place)
        done = sum(max(0, o.offset) for tp, o in committed.items()
                   if tp.topic == place["topic"])
        return {"lag": max(0, ends - done), "committed": done}

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "kafka", "bootstrap_servers": [self.bootstrap],
                "topics": [place["topic"]], "group_id": place["group"]}

    def sink_block(self, place: Place, params: Params) -> dict[str, Any]:
        # acks=all is the sink's default; said here, as the Go-bridge comparison states it
        return {"type": "kafka", "bootstrap_servers": [self.bootstrap],
                "topic": place["topic"], "acks": "all"}

    async def arrivals(self, place: Place, prefix: int) -> dict[str, Any]:
        """After a run (not timed): read the whole topic back and count its records,
        the distinct ones by their first ``prefix`` bytes (payload "seq": the
        sequence number) and the records per partition."""
        topic = place["topic"]
        reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, client_id="bench-reader",
                                  enable_auto_commit=False, fetch_max_bytes=FETCH_MAX_BYTES,
                                  max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES)
        await reader.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(place["partitions"])]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            ends = await reader.end_offsets(tps)
            seen: set[bytes] = set()
            per_partition = dict.fromkeys(range(place["partitions"]), 0)
            records = idle = 0
            async def behind() -> bool:
                return any([await reader.position(tp) < ends[tp] for tp in tps])

            while idle < 10 and await behind():
                batches = await reader.getmany(timeout_ms=1000, max_records=10_000)
                if not batches:
                    idle += 1
                    continue
                idle = 0
                for tp, recs in batches.items():
                    per_partition[tp.partition] += len(recs)
                    records += len(recs)
                    seen.update((r.value or b"")[:prefix] for r in recs)
            return {"records": records, "distinct": len(seen),
                    "per_partition": [per_partition[p] for p in sorted(per_partition)]}
        finally:
            await reader.stop()

    def describe(self) -> dict[str, str]:
        return {"aiokafka": importlib.metadata.version("aiokafka"),
                "kafka_topic": f"{PARTITIONS} partitions, replication 1, keyless records",
                "kafka_producer": f"acks=all, idempotent, linger {LINGER_MS}ms, "
                f"max_batch_size {MAX_BATCH_SIZE // 1024} KiB (sink defaults)",
                "kafka_consumer": f"fetch_max_bytes 16 MiB, max_partition_fetch_bytes 1 MiB, "
                f"{ISOLATION} (source defaults)"}

    # ---- raw legs

    async def _produce(self, place: Place, params: Params,
                       enqueue: Callable[[AIOKafkaProducer, str, bytes, int],
                                         Awaitable[list[asyncio.Future[Any]]]]) -> Sample:
        """``count`` messages in batches of ``batch``: ``enqueue`` hands a batch to the
        producer and returns its futures; ``max_in_flight`` batches outstanding."""
        producer = _producer(self.bootstrap, "bench-kafka-produce")
        await producer.start()
        topic, data = place["topic"], os.urandom(params.size)
        await producer.partitions_for(topic)  # metadata before the clock starts
        slots = asyncio.Semaphore(params.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        errors: list[str] = []

        async def settle(futures: list[asyncio.Future[Any]]) -> None:
            try:
                for result in await asyncio.gather(*futures, return_exceptions=True):
                    if isinstance(result, BaseException):
                        errors.append(f"{type(result).__name__}: {result}")
            finally:
                slots.release()

        watch = Stopwatch()
        sent = 0
        while sent < params.count:
            k = min(params.batch, params.count - sent)
            await slots.acquire()
            task = asyncio.create_task(settle(await enqueue(producer, topic, data, k)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += k
        if tasks:
            await asyncio.gather(*tasks)
        sample = watch.sample(sent, notes=[f"{len(errors)} send errors, first: {errors[0]}"]
                              if errors else [])
        await producer.stop()
        return sample

    async def produce_send_gather(self, place: Place, params: Params) -> Sample:
        async def enqueue(producer: AIOKafkaProducer, topic: str, data: bytes,
                          k: int) -> list[asyncio.Future[Any]]:
            send = producer.send
            return [await send(topic, data) for _ in range(k)]

        return await self._produce(place, params, enqueue)

    async def produce_send_batch(self, place: Place, params: Params) -> Sample:
        async def enqueue(producer: AIOKafkaProducer, topic: str, data: bytes,
                          k: int) -> list[asyncio.Future[Any]]:
            partitions = sorted(await producer.partitions_for(topic))
            share = -(-k // len(partitions))  # keyless: an even share per partition
            futures = []
            for i, partition in enumerate(partitions):
                left = min(share, k - i * share)
                while left > 0:
                    batch, before = producer.create_batch(), left
                    while left > 0 and batch.append(key=None, value=data,
                                                    timestamp=None) is not None:
                        left -= 1
                    if left == before:
                        raise ValueError(f"a {len(data)} B record does not fit a batch")
                    batch.close()
                    futures.append(await producer.send_batch(batch, topic,
                                                             partition=partition))
            return futures

        return await self._produce(place, params, enqueue)

    async def _consume(self, place: Place, params: Params, ready: Ready,
                       interval: float | None) -> Sample:
        """Read ``count`` records with getmany; commit the positions after every batch
        (``interval`` None) or when ``interval`` seconds have passed, and at the end."""
        consumer = AIOKafkaConsumer(
            place["topic"], bootstrap_servers=self.bootstrap, client_id="bench-kafka-consume",
            group_id=place["group"], enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_bytes=FETCH_MAX_BYTES, max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS, isolation_level=ISOLATION)
        await consumer.start()
        for _ in range(3000):  # the group join runs in aiokafka's coordinator task
            if consumer.assignment():
                break
            await asyncio.sleep(0.01)
        await ready()
        n, batch = params.count, params.batch
        count = idle = commits = 0
        clock = asyncio.get_running_loop().time
        watch = Stopwatch()
        next_commit = clock() + (interval or 0.0)
        while count < n and idle < IDLE_END:
            records = await consumer.getmany(timeout_ms=1000, max_records=batch)
            got = sum(len(recs) for recs in records.values())
            if not got:
                idle += 1
                continue
            idle = 0
            count += got
            if interval is None or clock() >= next_commit:
                await consumer.commit()  # the positions now cover this batch
                commits += 1
                next_commit = clock() + (interval or 0.0)
        await consumer.commit()
        commits += 1
        sample = watch.sample(count, notes=[] if count >= n else
                              [f"only {count} of {n} read"])
        await consumer.stop()
        return sample

    async def consume_commit_each(self, place: Place, params: Params, ready: Ready) -> Sample:
        return await self._consume(place, params, ready, None)

    async def consume_commit_1s(self, place: Place, params: Params, ready: Ready) -> Sample:
        return await self._consume(place, params, ready, COMMIT_INTERVAL)


# core NATS / JetStream <-> Kafka (the nats and jetstream endpoints are in legs/nats.py)
pair(Pair("nats", "kafka"))
pair(Pair("jetstream", "kafka", quick_count=50_000))  # 10,000 are written before a poll
pair(Pair("kafka", "jetstream"))
pair(Pair("kafka", "nats", default=False))
