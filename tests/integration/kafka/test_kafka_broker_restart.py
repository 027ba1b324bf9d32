"""Issue 3: the Kafka broker stopped and restarted mid-stream (``scripts/services
restart kafka``, data kept): natsconn reconnects by itself, in both directions,
and nothing is lost.

Other tests share the broker, so this is the only test that restarts it. Feeders
keep producing while it is down: JetStream at a steady rate, Kafka retrying
each window until the broker takes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from nats.aio.client import Client as NATS

from ..helpers import (
    assert_all_present,
    create_stream,
    natsconn_process,
    payload,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    stream_count,
    wait_consumer_drained,
    wait_until,
)
from .kafka_helpers import committed, create_topic, end_offsets, read_topic, topic_count

pytestmark = pytest.mark.integration

N = 20_000  # per direction
WINDOW = 500
PAUSE = 0.1  # between windows: the feed lasts ~4 s plus the outage
SERVICES = Path(__file__).resolve().parents[3] / "scripts" / "services"


async def feed_jetstream(nc: NATS, subject: str) -> None:
    for first in range(0, N, WINDOW):
        await publish_js(nc, subject, WINDOW, start=first)
        await asyncio.sleep(PAUSE)


async def feed_kafka(bootstrap: str, topic: str) -> int:
    """Produce 0..N-1; a window that fails (broker down) is sent again. Returns how
    many windows had to be retried."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                request_timeout_ms=5000, linger_ms=5)
    await producer.start()
    retried = 0
    try:
        for first in range(0, N, WINDOW):
            while True:
                try:
                    futures = [await producer.send(topic, payload(i))
                               for i in range(first, first + WINDOW)]
                    await asyncio.gather(*futures)
                    break
                except Exception:
                    retried += 1
                    await asyncio.sleep(0.5)
            await asyncio.sleep(PAUSE)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
    return retried


async def restart_kafka() -> float:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(SERVICES), "restart", "kafka", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, f"scripts/services restart kafka failed:\n{out.decode()}"
    return time.monotonic() - started


async def test_broker_restart_mid_stream_both_directions(
        nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    to_kafka, from_kafka = f"brk-out-{unique}", f"brk-in-{unique}"
    js_in, js_out, durable = f"BRK_IN_{unique}", f"BRK_OUT_{unique}", f"brk-{unique}"
    await create_topic(kafka_bootstrap, to_kafka, partitions=3)
    await create_topic(kafka_bootstrap, from_kafka, partitions=3)
    await create_stream(nc, js_in, [f"brkin.{unique}.>"])
    await create_stream(nc, js_out, [f"brkout.{unique}.>"])
    kafka = {"bootstrap_servers": [kafka_bootstrap], "request_timeout": "10s"}
    file = pipeline_file(tmp_path, [
        {"name": f"brk-to-kafka-{unique}",
         "source": {"type": "jetstream", "servers": [nats_url], "stream": js_in,
                    "durable": durable, "ack_wait": "30s"},
         "sink": {"type": "kafka", "topic": to_kafka, **kafka}},
        {"name": f"brk-from-kafka-{unique}",
         "source": {"type": "kafka", "topics": [from_kafka], **kafka},
         "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"brkout.{unique}.x"}},
    ])
    async with natsconn_process(file) as proc:
        feeders = asyncio.gather(feed_jetstream(nc, f"brkin.{unique}.x"),
                                 feed_kafka(kafka_bootstrap, from_kafka))

        async def flowing() -> bool:
            return (await topic_count(kafka_bootstrap, to_kafka) > 2 * WINDOW
                    and await stream_count(nc, js_out) > 2 * WINDOW)

        await wait_until(flowing, 30, "both directions flowing before the restart")
        outage = await restart_kafka()
        _, retried = await asyncio.wait_for(feeders, 180)
        at_end = await stream_count(nc, js_out)

        # Everything through: the JetStream consumer fully acked (so every message is
        # in Kafka), and the Kafka group's offsets committed up to the end.
        await wait_consumer_drained(nc, js_in, durable, timeout=120)
        ends = await end_offsets(kafka_bootstrap, from_kafka)

        async def consumed() -> bool:
            done = await committed(kafka_bootstrap, f"natsconn-brk-from-kafka-{unique}",
                                   from_kafka, 3)
            return done == ends

        await wait_until(consumed, 120, "the kafka source's offsets committed to the end")
        log = proc.log()
    total = await topic_count(kafka_bootstrap, to_kafka)
    records = await read_topic(kafka_bootstrap, to_kafka, total)
    assert_all_present([seq_of(r.value) for r in records], N, f"topic {to_kafka}")
    out = await read_stream(nc, js_out)
    assert_all_present([seq_of(m.data) for m in out], N, f"stream {js_out}")
    # The pipelines rode the outage out: no restart, and aiokafka's reconnect
    # attempts (ten a second) were rate-limited in the log.
    assert "restarts in" not in log, "a pipeline failed and was restarted"
    noise = [ln for ln in log.splitlines()
             if '"logger": "aiokafka' in ln and '"level": "info"' not in ln]
    assert len(noise) < 100, f"{len(noise)} aiokafka warning/error lines for one outage"
    fed = await topic_count(kafka_bootstrap, from_kafka)
    print(f"restart took {outage:.1f}s; {retried} feeder windows retried ({fed - N} records "
          f"fed twice); {at_end} out of Kafka when the feed ended; {total - N} written to "
          f"Kafka twice, {len(out) - N} into JetStream twice; {len(noise)} aiokafka lines")
