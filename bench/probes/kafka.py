"""Kafka: an open-loop sender (the batch API, futures settled at the end), a
consumer without a group as the receiver, one acknowledged send as the round trip.

The sender and the round trip use the sink's producer settings except
``linger_ms=0``: the sender's linger would be counted as pipeline latency,
and the round trip is one request and its acknowledgement.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ..endpoint import Ready
from ..legs.kafka import DEFAULT_BOOTSTRAP, MAX_BATCH_SIZE, MAX_REQUEST_SIZE
from ..model import Params, Place
from ..schedule import MIN_SIZE, Schedule
from ..timed import Arrivals, open_loop, receiver, round_trip, sender, time_each


def _producer(env: dict[str, str], client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=env.get("KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP), client_id=client_id,
        acks="all", enable_idempotence=True, linger_ms=0, max_batch_size=MAX_BATCH_SIZE,
        max_request_size=MAX_REQUEST_SIZE)


@sender("kafka")
async def send_kafka(env: dict[str, str], place: Place, params: Params,
                     schedule: Schedule) -> dict[str, Any]:
    producer = _producer(env, "bench-latency-send")
    await producer.start()
    topic = place["topic"]
    partitions = sorted(await producer.partitions_for(topic))
    futures: list[asyncio.Future[Any]] = []
    turn = 0

    async def write(payloads: list[bytes]) -> None:
        """A chunk split over the partitions in turn, one record batch per part."""
        nonlocal turn
        share = -(-len(payloads) // len(partitions))
        for i in range(0, len(payloads), share):
            part = payloads[i:i + share]
            partition = partitions[turn % len(partitions)]
            turn += 1
            j = 0
            while j < len(part):
                batch = producer.create_batch()
                while j < len(part) and batch.append(key=None, value=part[j],
                                                     timestamp=None) is not None:
                    j += 1
                batch.close()
                futures.append(await producer.send_batch(batch, topic, partition=partition))

    out = await open_loop(schedule, params.size, write)
    results = await asyncio.gather(*futures, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    out["publish_errors"] = len(errors)
    if errors:
        out["notes"] = [f"{len(errors)} send errors, first: {errors[0]!r}"]
    await producer.stop()
    return out


@receiver("kafka")
async def receive_kafka(env: dict[str, str], place: Place, params: Params, arrivals: Arrivals,
                        ready: Ready) -> None:
    """Every partition assigned by hand (no group, nothing to join), from the start."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.get("KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP),
        client_id="bench-latency-receive", enable_auto_commit=False, group_id=None,
        fetch_max_wait_ms=100, max_partition_fetch_bytes=MAX_REQUEST_SIZE,
        isolation_level="read_uncommitted")
    await consumer.start()
    tps = [TopicPartition(place["topic"], p) for p in range(place["partitions"])]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    await ready()

    async def read() -> None:
        add = arrivals.add
        while not arrivals.done:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            now = time.time_ns()
            for records in batches.values():
                for record in records:
                    if record.value is not None:
                        add(record.value, now)

    task = asyncio.create_task(read())
    await arrivals.wait(deadline=600)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await consumer.stop()


@round_trip("kafka")
async def round_trip_kafka(env: dict[str, str], place: Place, params: Params,
                           n: int) -> list[int]:
    """``send_and_wait`` of one record (acks=all, idempotent, linger 0)."""
    producer = _producer(env, "bench-rtt")
    await producer.start()
    data = bytes(max(params.size, MIN_SIZE))
    await producer.send_and_wait(place["topic"], data)  # metadata, connection
    out = await time_each(n, lambda: producer.send_and_wait(place["topic"], data, partition=0))
    await producer.stop()
    return out
