"""The Kafka source and sink against the conformance kit, on the real KRaft broker
(``scripts/services start kafka``).

Each test gets its own topic ``conf-<unique>`` (created by the broker on first
use, 3 partitions) and consumer group. The kit's TCP proxy sits in front of
the broker; ``broker_address_map`` sends every connection the client makes
after the bootstrap (to the broker and its group coordinator, which it learns
from metadata as 127.0.0.1:9092) through the proxy too, so a cut really cuts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from natsconn_kafka.headers import decode_headers, encode_headers
from natsconn_kafka.sink import KafkaSink
from natsconn_kafka.source import KafkaSource

from connector import Message
from connector.testing.kit import SinkSuite, SourceSuite

# The sink's default max_request_size: a record of one byte more is refused.
MAX_REQUEST = 1024 * 1024
MAX_PENDING = 10  # per partition, so that the saturation test saturates

Produce = Callable[[list[Message]], Awaitable[None]]
Fetch = Callable[[int, float], Awaitable[list[Message]]]


@pytest.fixture
def server_address(kafka_bootstrap: str) -> str:
    return kafka_bootstrap


@pytest.fixture
def topic(unique: str) -> str:
    return f"conf-{unique}"


def _through(address: str | None, server: str) -> dict[str, Any]:
    """Connection options: straight to ``server``, or everything via ``address``."""
    if address is None:
        return {"bootstrap_servers": [server]}
    return {"bootstrap_servers": [address], "broker_address_map": {server: address}}


@pytest.fixture
async def producer(server_address: str) -> AsyncIterator[AIOKafkaProducer]:
    """A raw producer straight to the broker (never through the test proxy)."""
    client = AIOKafkaProducer(bootstrap_servers=server_address, acks="all")
    await client.start()
    yield client
    await client.stop()


class TestKafkaSource(SourceSuite):
    redelivery_wait = 5.0  # a nack seeks back at once
    keeps_key = True
    keeps_order = True  # everything is produced to one partition

    @pytest.fixture
    def make_source(self, server_address: str, topic: str,
                    unique: str) -> Callable[[str | None], KafkaSource]:
        def make(address: str | None = None) -> KafkaSource:
            return KafkaSource.make_test_instance(
                **_through(address, server_address), topics=[topic],
                group_id=f"conf-{unique}", commit_interval="200ms",
                session_timeout="6s", heartbeat_interval="1s",
                max_pending_per_partition=MAX_PENDING, request_timeout="10s")
        return make

    @pytest.fixture
    async def produce(self, producer: AIOKafkaProducer, topic: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            futures = [
                await producer.send(topic, m.data, key=m.key, partition=0,
                                    headers=encode_headers(m.headers))
                for m in messages
            ]
            await asyncio.gather(*futures)
        return produce


class TestKafkaSink(SinkSuite):
    keeps_key = True
    max_message_bytes = MAX_REQUEST

    @pytest.fixture
    def make_sink(self, server_address: str, topic: str) -> Callable[[str | None], KafkaSink]:
        def make(address: str | None = None) -> KafkaSink:
            return KafkaSink.make_test_instance(
                **_through(address, server_address), topic=topic, linger="1ms",
                request_timeout="10s")
        return make

    @pytest.fixture
    async def fetch(self, server_address: str, topic: str) -> Fetch:
        async def fetch(count: int, timeout: float) -> list[Message]:
            return await read_topic(server_address, topic, count, timeout)
        return fetch


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float) -> list[Message]:
    """Every record of ``topic`` from the beginning (no group), until ``count`` are in
    or ``timeout`` passed; partition by partition in offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        partitions: set[int] | None = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                await consumer._client._wait_on_metadata(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        by_partition: dict[int, list[Message]] = {}
        got = 0
        while got < count and time.monotonic() < deadline:
            left = max(0.0, deadline - time.monotonic())
            records = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            for tp, recs in records.items():
                for r in recs:
                    by_partition.setdefault(tp.partition, []).append(Message(
                        r.value or b"", r.topic, r.key, decode_headers(r.headers),
                        r.timestamp / 1000, f"{r.topic}/{r.partition}/{r.offset}"))
                    got += 1
        return [m for p in sorted(by_partition) for m in by_partition[p]]
    finally:
        await consumer.stop()
