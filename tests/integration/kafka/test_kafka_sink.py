"""The kafka sink's error mapping and options on the real broker: a record the
broker refuses as too large is isolated (the rest of its record batch is
written), a topic the broker will not create and an illegal topic name are
rejected per message, every compression codec round-trips, and bad option
combinations fail at validation."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from natsconn_kafka.sink import KafkaSink
from pydantic import ValidationError

from connector import Message, PartialWriteError, RejectedError

from ..helpers import payload, seq_of
from .kafka_helpers import create_topic, read_topic, wait_topic

pytestmark = pytest.mark.integration


def msg(seq: int, subject: str = "a.b.c", size: int = 0, **headers: str) -> Message:
    data = payload(seq) + b" " * size
    return Message(data, subject, None, headers, time.time(), f"t:{seq}")


async def test_broker_side_too_large_is_isolated(kafka_bootstrap: str, unique: str) -> None:
    topic = f"big-{unique}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1,
                                            topic_configs={"max.message.bytes": "20000"})])
    finally:
        await admin.close()
    await wait_topic(kafka_bootstrap, topic, 1)
    # The client allows 1 MiB: only the broker (topic max.message.bytes) refuses.
    sink = KafkaSink.make_test_instance(bootstrap_servers=[kafka_bootstrap], topic=topic,
                                        linger="50ms")
    await sink.connect()
    try:
        batch = [msg(0), msg(1, size=30_000), msg(2), msg(3)]
        with pytest.raises(PartialWriteError) as err:
            await sink.write_batch(batch)
        assert set(err.value.failed) == {1}
        assert isinstance(err.value.failed[1], RejectedError), err.value.failed
    finally:
        await sink.close()
    records = await read_topic(kafka_bootstrap, topic, 3)
    assert sorted(seq_of(r.value) for r in records) == [0, 2, 3]


async def test_unknown_topic_and_illegal_name_are_rejected(kafka_bootstrap: str,
                                                           unique: str) -> None:
    good, taken = f"ok-{unique}", f"clash_{unique}_x"
    await create_topic(kafka_bootstrap, good, partitions=1)
    # A topic whose name collides with `taken` (same after '.' -> '_'): the broker
    # refuses to create it, as it would any topic with auto-create off.
    await create_topic(kafka_bootstrap, taken, partitions=1)
    sink = KafkaSink.make_test_instance(bootstrap_servers=[kafka_bootstrap],
                                        topic="{header[T]}", metadata_timeout="2s")
    await sink.connect()
    try:
        batch = [msg(0, T=good), msg(1, T=f"clash.{unique}.x"), msg(2, T="bad topic!"),
                 msg(3, T=good), msg(4)]
        with pytest.raises(PartialWriteError) as err:
            await sink.write_batch(batch)
        failed = err.value.failed
        assert set(failed) == {1, 2, 4}, failed
        assert all(isinstance(e, RejectedError) for e in failed.values()), failed
        assert "does not exist" in str(failed[1]), failed[1]
        assert "invalid Kafka topic" in str(failed[2]), failed[2]
        assert "header 'T'" in str(failed[4]), failed[4]
    finally:
        await sink.close()
    records = await read_topic(kafka_bootstrap, good, 2)
    assert [seq_of(r.value) for r in records] == [0, 3]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_compression_round_trip(kafka_bootstrap: str, unique: str, codec: str) -> None:
    topic = f"codec-{codec}-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=1)
    sink = KafkaSink.make_test_instance(bootstrap_servers=[kafka_bootstrap], topic=topic,
                                        compression=codec, key="{subject[1]}",
                                        metadata_headers=True)
    await sink.connect()
    try:
        await sink.write_batch([msg(i, subject=f"a.k{i % 3}", size=100) for i in range(200)])
    finally:
        await sink.close()
    records = await read_topic(kafka_bootstrap, topic, 200)
    assert [seq_of(r.value) for r in records] == list(range(200))
    for r in records:
        seq = seq_of(r.value)
        assert r.key == b"k%d" % (seq % 3)
        assert dict(r.headers) == {"Natsconn-Source-Id": b"t:%d" % seq,
                                   "Natsconn-Original-Subject": b"a.k%d" % (seq % 3)}


@pytest.mark.parametrize(("options", "error"), [
    ({"acks": 1}, "enable_idempotence: false"),
    ({"topic": "no spaces"}, "invalid Kafka topic"),
    ({"topic": "{nope}"}, "unknown placeholder"),
    ({"tls": {"check_hostname": False}}, "use SSL or SASL_SSL"),
    ({"username": "u", "password": "p"}, "use SASL_PLAINTEXT or SASL_SSL"),
    ({"security_protocol": "SASL_SSL"}, "needs username and password"),
    ({"bootstrap_servers": "host-without-port"}, "expected host:port"),
    ({"max_batch_size": "2MiB"}, "must not exceed max_request_size"),
])
def test_bad_options_fail_validation(options: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error.replace("(", r"\(")):
        KafkaSink.make_test_instance(**options)
