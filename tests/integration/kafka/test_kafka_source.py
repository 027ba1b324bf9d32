"""The kafka source's offset and rebalance rules on the real broker: out-of-order
acks commit only the contiguous prefix, a revoke commits what is confirmed and
drops the rest (late acks ignored), nack(delay) rewinds after the delay, pattern
subscriptions, start positions and metadata headers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from natsconn_kafka.source import KafkaSource

from connector import Batch, Message
from connector.testing.kit import collect, collect_batches

from ..helpers import payload, seq_of, wait_until
from .kafka_helpers import committed, create_topic, produce

pytestmark = pytest.mark.integration


def source(bootstrap: str, group: str, **options: Any) -> KafkaSource:
    opts: dict[str, Any] = {"bootstrap_servers": [bootstrap], "group_id": group,
                            "commit_interval": "200ms", "session_timeout": "6s",
                            "heartbeat_interval": "1s", **options}
    return KafkaSource.make_test_instance(**opts)


def seqs(messages: list[Message]) -> list[int]:
    return [seq_of(m.data) for m in messages]


async def read_exactly(src: KafkaSource, n: int, max_messages: int) -> list[Batch]:
    batches = await collect_batches(src, n, 20.0, max_messages=max_messages)
    assert sum(len(b) for b in batches) == n
    return batches


async def test_out_of_order_acks_commit_only_the_contiguous_prefix(
        kafka_bootstrap: str, unique: str) -> None:
    topic, group = f"ooo-{unique}", f"ooo-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=1)
    await produce(kafka_bootstrap, topic, 30)
    first = source(kafka_bootstrap, group, topics=[topic])
    await first.connect()
    try:
        batches = await read_exactly(first, 30, 10)
        assert [len(b) for b in batches] == [10, 10, 10]
        await batches[2].ack.ack()
        await batches[0].ack.ack()
        await asyncio.sleep(1.0)  # several commit intervals
        assert await committed(kafka_bootstrap, group, topic, 1) == {0: 10}
    finally:
        await first.close()
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: 10}
    second = source(kafka_bootstrap, group, topics=[topic])
    await second.connect()
    try:
        again = await collect(second, 20, 20.0)
        assert seqs(again) == list(range(10, 30)), "the gap and what followed it come again"
    finally:
        await second.close()
    assert await committed(kafka_bootstrap, group, topic, 1) == {0: 30}


async def test_revoke_commits_confirmed_and_ignores_late_acks(
        kafka_bootstrap: str, unique: str) -> None:
    topic, group = f"rvk-{unique}", f"rvk-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=2)
    a = source(kafka_bootstrap, group, topics=[topic])
    b = source(kafka_bootstrap, group, topics=[topic])
    await a.connect()
    try:
        await produce(kafka_bootstrap, topic, 10, partition=0)
        (confirmed,) = await read_exactly(a, 10, 100)
        await confirmed.ack.ack()
        await produce(kafka_bootstrap, topic, 10, start=10, partition=1)
        (unconfirmed,) = await read_exactly(a, 10, 100)
        await b.connect()  # the group rebalances: a revokes both partitions first
        await wait_until(lambda: len(a._parts) == 1 and len(b._parts) == 1, 20,
                         "one partition each")
        assert await committed(kafka_bootstrap, group, topic, 2) == {0: 10, 1: -1}
        await unconfirmed.ack.ack()  # too late: its partition was revoked
        await asyncio.sleep(1.0)
        assert (await committed(kafka_bootstrap, group, topic, 2))[1] == -1, \
            "a late ack of a revoked partition was committed"
        got: list[Message] = []

        async def reread() -> bool:
            for src in (a, b):
                batch = await src.read_batch(100, 0.2)
                if batch is not None:
                    got.extend(batch.messages)
                    await batch.ack.ack()
            return sorted(seqs(got)) == list(range(10, 20))

        await wait_until(reread, 20, "partition 1 read again by its new owner", 0.0)
    finally:
        await b.close()
        await a.close()
    assert await committed(kafka_bootstrap, group, topic, 2) == {0: 10, 1: 10}


async def test_nack_with_delay_rereads_after_the_delay(kafka_bootstrap: str,
                                                        unique: str) -> None:
    topic = f"nack-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=1)
    await produce(kafka_bootstrap, topic, 10)
    src = source(kafka_bootstrap, f"nack-{unique}", topics=[topic])
    await src.connect()
    try:
        (batch,) = await read_exactly(src, 10, 100)
        loop = asyncio.get_running_loop()
        nacked = loop.time()
        await batch.ack.nack(1.5)
        assert await src.read_batch(100, 0.5) is None, "redelivered before the delay"
        again = await collect(src, 10, 10.0)
        assert loop.time() - nacked >= 1.4
        assert [m.id for m in again] == [m.id for m in batch.messages]
    finally:
        await src.close()


async def test_pattern_picks_up_a_topic_created_later(kafka_bootstrap: str,
                                                    unique: str) -> None:
    """A topic that starts to match the pattern after the source started is read
    from its first record once the metadata is refreshed (metadata_max_age)."""
    first, later = f"grow-{unique}-a", f"grow-{unique}-b"
    await create_topic(kafka_bootstrap, first, partitions=1)
    src = source(kafka_bootstrap, f"grow-{unique}", pattern=f"grow-{unique}-.*",
                 metadata_max_age="1s")
    await src.connect()
    try:
        await produce(kafka_bootstrap, first, 3)
        got = await collect(src, 3, 20.0)
        await create_topic(kafka_bootstrap, later, partitions=1)
        await produce(kafka_bootstrap, later, 4, start=10)
        got += await collect(src, 4, 30.0)
        got += await collect(src, 100, 1.0)  # nothing more
    finally:
        await src.close()
    assert sorted((m.subject, seq_of(m.data)) for m in got) == [
        (first, 0), (first, 1), (first, 2), (later, 10), (later, 11), (later, 12), (later, 13)]


async def test_pattern_start_latest_and_metadata_headers(kafka_bootstrap: str,
                                                         unique: str) -> None:
    topics = [f"pat-{unique}-a", f"pat-{unique}-b", f"other-{unique}"]
    for t in topics:
        await create_topic(kafka_bootstrap, t, partitions=1)
        await produce(kafka_bootstrap, t, 5)  # before: start latest skips these
    src = source(kafka_bootstrap, f"pat-{unique}", pattern=f"pat-{unique}-.*", start="latest",
                 metadata_headers=True, key_header="Kafka-Key")
    await src.connect()
    try:
        assert await src.read_batch(100, 1.0) is None
        for t in topics:
            await produce(kafka_bootstrap, t, 3, start=100, key=lambda i: b"\xffk%d" % i)
        got = await collect(src, 6, 20.0)
        got += await collect(src, 100, 1.0)
    finally:
        await src.close()
    assert sorted((m.subject, seq_of(m.data)) for m in got) == [
        (t, s) for t in topics[:2] for s in (100, 101, 102)]
    for m in got:
        seq = seq_of(m.data)
        assert m.key == b"\xffk%d" % seq
        assert m.headers["Kafka-Key"].encode("utf-8", "surrogateescape") == m.key
        assert m.headers["Natsconn-Kafka-Topic"] == m.subject
        assert m.headers["Natsconn-Kafka-Partition"] == "0"
        assert m.id == f"{m.subject}/0/{m.headers['Natsconn-Kafka-Offset']}"
        assert m.data == payload(seq)
