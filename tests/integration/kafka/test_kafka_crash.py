"""Issue 3: ``kill -9`` of ``natsconn run`` mid-stream and a restart, both directions.

* JetStream → Kafka: nothing lost (at least once: what the killed process had
  written but not acked is written again).
* Kafka → JetStream with ``Nats-Msg-Id`` from the offsets: nothing lost and
  no duplicate in the stream (offsets are committed only after the PubAck, and
  the re-read messages carry the same ids, which the stream drops).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from ..helpers import (
    assert_all_present,
    assert_exactly,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    stream_count,
    wait_consumer_drained,
    wait_stream_count,
    wait_until,
)
from .kafka_helpers import committed, create_topic, end_offsets, produce, read_topic, topic_count

pytestmark = pytest.mark.integration

N = 30_000
KILL_AT = 8_000
# Small batches, one write at a time: slow enough to be caught mid-stream.
FLOW: dict[str, Any] = {"batch": {"max_messages": 100, "max_wait": "10ms"}, "max_in_flight": 1}


async def kill_mid_stream(file: Path, through: Callable[[], Awaitable[int]]) -> int:
    async with natsconn_process(file, log_name="run1.log") as proc:
        count = 0

        async def far_enough() -> bool:
            nonlocal count
            count = await through()
            return count >= KILL_AT

        await wait_until(far_enough, 60, f"{KILL_AT} messages through natsconn", 0.02)
        proc.signal(signal.SIGKILL)
        assert await proc.wait_exit(10) == -signal.SIGKILL
        count = await through()
    assert count < N, f"natsconn finished ({count}) before it could be killed mid-stream"
    return count


async def test_kill_9_kafka_to_jetstream_no_loss_no_duplicate(
        nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topic, stream, pipeline = f"k9k-{unique}", f"K9K_OUT_{unique}", f"k9-kafka-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    await produce(kafka_bootstrap, topic, N, key=lambda i: b"k%d" % (i % 10))
    await create_stream(nc, stream, [f"k9kout.{unique}.>"])
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topics": [topic],
                   "commit_interval": "200ms"},
        "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"k9kout.{unique}.x"},
        **FLOW,
    }])

    async def in_stream() -> int:
        return await stream_count(nc, stream)

    at_kill = await kill_mid_stream(file, in_stream)
    before = sum(max(0, o) for o in (await committed(kafka_bootstrap, f"natsconn-{pipeline}",
                                                     topic, 3)).values())
    assert before <= at_kill, "offsets were committed for messages not yet in the stream"
    async with natsconn_process(file, log_name="run2.log"):
        await wait_stream_count(nc, stream, N, timeout=90)
        ends = await end_offsets(kafka_bootstrap, topic)

        async def all_committed() -> bool:
            done = await committed(kafka_bootstrap, f"natsconn-{pipeline}", topic, 3)
            return done == ends

        await wait_until(all_committed, 20, "every offset committed")
    got = await read_stream(nc, stream)
    assert_exactly([seq_of(m.data) for m in got], N, f"stream {stream} (killed at {at_kill})")
    print(f"killed with {at_kill} in the stream and {before} committed: "
          f"{at_kill - before} re-read after the restart, deduplicated by Nats-Msg-Id")


async def test_kill_9_jetstream_to_kafka_no_loss(
        nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topic, stream, durable = f"k9j-{unique}", f"K9J_IN_{unique}", f"k9j-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    await create_stream(nc, stream, [f"k9jin.{unique}.>"])
    await publish_js(nc, f"k9jin.{unique}.x", N)
    file = pipeline_file(tmp_path, [{
        "name": f"k9-js-{unique}",
        "source": {"type": "jetstream", "servers": [nats_url], "stream": stream,
                   "durable": durable, "ack_wait": "2s"},
        "sink": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topic": topic},
        **FLOW,
    }])

    async def in_topic() -> int:
        return await topic_count(kafka_bootstrap, topic)

    at_kill = await kill_mid_stream(file, in_topic)
    async with natsconn_process(file, log_name="run2.log"):
        await wait_consumer_drained(nc, stream, durable, timeout=90)
    total = await topic_count(kafka_bootstrap, topic)
    records = await read_topic(kafka_bootstrap, topic, total)
    assert_all_present([seq_of(r.value) for r in records], N, f"topic {topic}")
    print(f"killed with {at_kill} in Kafka; {total - N} written twice (at least once)")
