"""Issue 3: two natsconn processes in one consumer group split the partitions and
together deliver every message (Kafka → JetStream, deduplicated by offsets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from ..helpers import (
    NatsconnProcess,
    assert_exactly,
    create_stream,
    natsconn_process,
    pipeline_file,
    read_stream,
    seq_of,
    wait_stream_count,
    wait_until,
)
from .kafka_helpers import create_topic, produce

pytestmark = pytest.mark.integration

N = 30_000
PARTITIONS = 6
_ASSIGNED = re.compile(r"kafka: (\d+) partition\(s\) assigned")


def last_assignment(proc: NatsconnProcess) -> int | None:
    found = _ASSIGNED.findall(proc.log())
    return int(found[-1]) if found else None


async def test_two_processes_split_partitions(
        nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topic, stream, pipeline = f"grp-{unique}", f"GRP_OUT_{unique}", f"grp-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    await create_stream(nc, stream, [f"grpout.{unique}.>"])
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topics": [topic],
                   "session_timeout": "6s", "heartbeat_interval": "1s"},
        "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"grpout.{unique}.x"},
    }])
    async with natsconn_process(file, log_name="a.log") as a, \
            natsconn_process(file, log_name="b.log") as b:

        def split() -> bool:
            mine, theirs = last_assignment(a), last_assignment(b)
            return mine is not None and theirs is not None and mine + theirs == PARTITIONS \
                and mine > 0 and theirs > 0

        await wait_until(split, 30, "the group's partitions split between both processes")
        await produce(kafka_bootstrap, topic, N, key=lambda i: b"k%d" % (i % 100))
        await wait_stream_count(nc, stream, N, timeout=90)
        got_a = await a.metric("natsconn_messages_in_total", pipeline)
        got_b = await b.metric("natsconn_messages_in_total", pipeline)
        shares = (last_assignment(a), last_assignment(b))
    out = await read_stream(nc, stream)
    assert_exactly([seq_of(m.data) for m in out], N, f"stream {stream}")
    assert got_a > 0 and got_b > 0, f"one process did all the work: {got_a} / {got_b}"
    assert got_a + got_b >= N
    print(f"partitions {shares[0]} + {shares[1]}; messages {got_a:.0f} + {got_b:.0f}")
