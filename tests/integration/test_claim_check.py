"""Issue 14, claim check: 5 MiB Kafka records → JetStream → Kafka, byte-equal,
through a NATS server whose ``max_payload`` is 1 MiB.

The shared server allows 8 MiB, so this test starts a nats-server of its own
with ``max_payload: 1MB`` (see nats_dedicated.py). Kafka side: topics with
``max.message.bytes`` of 8 MiB, producer and sink ``max_request_size`` 8 MiB.

Pipeline 1: ``kafka`` → ``claim_check_put`` (objects in a bucket on the small
server) → ``jetstream`` (empty payloads with the reference headers).
Pipeline 2: ``jetstream`` → ``claim_check_get`` → ``kafka``.

``NATSCONN_CLAIM_CHECK_MESSAGES`` sets the count (default 20 for CI; the
issue's full run is ``NATSCONN_CLAIM_CHECK_MESSAGES=200``, about 1 GiB through
each system).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import nats
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from .helpers import pipeline_file, read_stream, run_in_process, wait_ready_in_process, wait_until
from .kafka.kafka_helpers import topic_count, wait_topic
from .nats_dedicated import dedicated_nats_server

pytestmark = pytest.mark.integration

COUNT = int(os.environ.get("NATSCONN_CLAIM_CHECK_MESSAGES", "20"))
SIZE = 5 * 1024 * 1024
LIMIT = 8 * 1024 * 1024  # Kafka record size allowed on both topics


def _payload(i: int) -> bytes:
    """5 MiB that differ per message and per chunk (not one repeated block)."""
    seed = hashlib.sha256(b"claim-check-%d" % i).digest()
    block = hashlib.sha512(seed).digest() * 2048  # 128 KiB
    return b"".join(bytes([j]) + block[1:] for j in range(SIZE // len(block)))


async def _topics(bootstrap: str, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, 1, 1, topic_configs={
            "max.message.bytes": str(LIMIT + 1024)}) for n in names])
    finally:
        await admin.close()
    for name in names:
        await wait_topic(bootstrap, name, 1)


async def _produce(bootstrap: str, topic: str) -> dict[bytes, str]:
    """COUNT records of SIZE bytes; returns key -> sha256 of the value."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                max_request_size=LIMIT + 1024, max_batch_size=LIMIT + 1024)
    await producer.start()
    digests = {}
    try:
        for i in range(COUNT):
            data = _payload(i)
            key = b"m%d" % i
            digests[key] = hashlib.sha256(data).hexdigest()
            await (await producer.send(topic, data, key=key,
                                       headers=[("X-Seq", str(i).encode())]))
    finally:
        await producer.stop()
    return digests


async def _read(bootstrap: str, topic: str) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=2 * LIMIT, fetch_max_bytes=2 * LIMIT)
    await consumer.start()
    out: list[tuple[bytes, bytes, dict[str, bytes]]] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 60
        while len(out) < COUNT and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                out.extend((r.key, r.value, dict(r.headers)) for r in recs)
    finally:
        await consumer.stop()
    return out


async def test_5_mib_records_cross_a_1_mib_nats_server_byte_equal(
        kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topic_in, topic_out = f"cc-in-{unique}", f"cc-out-{unique}"
    stream, bucket = f"CC_{unique}", f"cc_{unique}"
    await _topics(kafka_bootstrap, topic_in, topic_out)
    started = time.monotonic()
    digests = await _produce(kafka_bootstrap, topic_in)
    produced = time.monotonic()
    async with dedicated_nats_server(tmp_path / "nats", max_payload="1MB") as url:
        nc = await nats.connect(url)
        try:
            assert nc.max_payload == 1024 * 1024
            with pytest.raises(nats.errors.MaxPayloadError):  # what the claim check avoids
                await nc.jetstream().publish("x", _payload(0))
            kafka_in = {"type": "kafka", "bootstrap_servers": [kafka_bootstrap],
                        "topics": [topic_in], "max_partition_fetch_bytes": "16MiB",
                        "fetch_max_bytes": "32MiB", "commit_interval": "200ms",
                        "key_header": "Kafka-Key"}  # JetStream has no key: carried in a header
            file = pipeline_file(tmp_path, [
                {"name": f"cc-put-{unique}", "source": kafka_in,
                 "transforms": [{"type": "claim_check_put", "servers": [url], "bucket": bucket,
                                 "create_bucket": True, "ttl": "1h", "threshold": "512KiB"}],
                 "sink": {"type": "jetstream", "servers": [url], "subject": f"cc.{unique}.x",
                          "stream": stream, "stream_subjects": [f"cc.{unique}.>"]},
                 "batch": {"max_messages": 10, "max_bytes": "64MiB"}},
                {"name": f"cc-get-{unique}",
                 "source": {"type": "jetstream", "servers": [url], "stream": stream,
                            "subjects": [f"cc.{unique}.>"], "durable": f"cc-{unique}"},
                 "transforms": [{"type": "claim_check_get", "servers": [url],
                                 "bucket": bucket}],
                 "sink": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap],
                          "topic": topic_out, "key": "{header[Kafka-Key]}",
                          "max_request_size": "9MiB"},
                 "batch": {"max_messages": 10, "max_bytes": "64MiB"}},
            ])
            async with run_in_process(file) as supervisor:
                await wait_ready_in_process(supervisor)

                async def all_out() -> bool:
                    return await topic_count(kafka_bootstrap, topic_out) >= COUNT

                await wait_until(all_out, 120, f"{COUNT} records in {topic_out}", 0.5)
            through = time.monotonic()
            in_stream = await read_stream(nc, stream)
        finally:
            await nc.close()
    # What crossed NATS: references only, each far below max_payload.
    assert len(in_stream) >= COUNT
    assert all(m.data == b"" and m.headers and m.headers["Natsconn-Claim-Check"]
               .startswith(f"{bucket}/") for m in in_stream)
    got = await _read(kafka_bootstrap, topic_out)
    assert len(got) == COUNT, f"{len(got)} records in {topic_out}, expected {COUNT}"
    by_key = {k: (hashlib.sha256(v).hexdigest(), len(v), h) for k, v, h in got}
    assert set(by_key) == set(digests)
    for key, (digest, size, headers) in by_key.items():
        assert size == SIZE and digest == digests[key], f"record {key!r} changed"
        assert headers["X-Seq"] == key[1:]
        assert not any(h.startswith("Natsconn-Claim-Check") for h in headers)
    print(f"{COUNT} records of {SIZE} bytes: produced in {produced - started:.1f}s, "
          f"Kafka -> JetStream (max_payload 1 MiB) -> Kafka in {through - produced:.1f}s, "
          "byte-equal")
