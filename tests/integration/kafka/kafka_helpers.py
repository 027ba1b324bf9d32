"""Raw aiokafka legs for the Kafka integration tests: topics, pipelined produce,
reading a whole topic back, committed offsets and end offsets.

Payloads are ``{"seq": N}`` (see ``..helpers.payload``) so every message names
itself and the tests compare sets of sequence numbers, never just counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from ..helpers import payload

SASL_USER = "natsconn"
SASL_PASSWORD = "natsconn-secret"


async def create_topic(bootstrap: str, name: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    await wait_topic(bootstrap, name, partitions)


async def wait_topic(bootstrap: str, name: str, partitions: int, timeout: float = 20.0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        deadline = time.monotonic() + timeout
        while len(await producer.partitions_for(name)) != partitions:
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {name} not ready with {partitions} partitions")
            await asyncio.sleep(0.2)
            await producer.client.force_metadata_update()
    finally:
        await producer.stop()


async def produce(
    bootstrap: str, topic: str, count: int, *, start: int = 0,
    key: Callable[[int], bytes | None] = lambda _i: None,
    headers: Callable[[int], Mapping[str, str]] | None = None,
    data: Callable[[int], bytes] = payload, window: int = 5000,
    partition: int | None = None,
) -> None:
    """Produce ``count`` records, ``window`` of them in flight at a time, acks=all."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=5,
                                max_batch_size=256 * 1024)
    await producer.start()
    try:
        for first in range(start, start + count, window):
            futures = []
            for i in range(first, min(first + window, start + count)):
                hdrs = [(k, v.encode()) for k, v in headers(i).items()] if headers else None
                futures.append(await producer.send(topic, data(i), key=key(i), headers=hdrs,
                                                   partition=partition))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if parts is None:
            await consumer._client._wait_on_metadata(topic)
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def topic_count(bootstrap: str, topic: str) -> int:
    """Records in ``topic`` (sum of end offsets; topics here are never compacted)."""
    try:
        return sum((await end_offsets(bootstrap, topic)).values())
    except Exception:
        return 0


async def read_topic(bootstrap: str, topic: str, count: int,
                     timeout: float = 60.0) -> list[Any]:
    """The first ``count`` records of ``topic`` (all partitions, from the start),
    as aiokafka ConsumerRecords, partition by partition in offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        await consumer._client._wait_on_metadata(topic)
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got: dict[int, list[Any]] = {tp.partition: [] for tp in tps}
        total = 0
        deadline = time.monotonic() + timeout
        while total < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"read {total} of {count} records of {topic} "
                                     f"in {timeout}s")
            records = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, recs in records.items():
                got[tp.partition].extend(recs)
                total += len(recs)
        return [r for p in sorted(got) for r in got[p]]
    finally:
        await consumer.stop()


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets (-1 where none) without joining the group."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    out = dict.fromkeys(range(partitions), -1)
    for tp, meta in offsets.items():
        if tp.topic == topic:
            out[tp.partition] = meta.offset
    return out
