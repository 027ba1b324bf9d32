"""Issue 6: three ``natsconn run`` processes with the same pipeline file, as three pods
of the chart would run it, share the work through the source's own mechanism.

The sink is a JetStream stream *without* deduplication (``dedupe: false``): a message
that two replicas both delivered would show up twice there. 100,000 messages go
through; each must arrive exactly once (no process crashes, so at-least-once delivery
has no reason to repeat anything), and each process must have written a share.
"""

from __future__ import annotations

import re
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from .helpers import (
    NatsconnProcess,
    assert_exactly,
    consumer_info,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    wait_consumer_drained,
    wait_stream_count,
    wait_until,
)
from .kafka.kafka_helpers import create_topic, produce

pytestmark = pytest.mark.integration

N = 100_000
REPLICAS = 3
OUT = "natsconn_messages_out_total"
IN = "natsconn_messages_in_total"


async def _start_replicas(stack: AsyncExitStack, file: Path) -> list[NatsconnProcess]:
    """REPLICAS processes on their own HTTP ports, named like pods (NATSCONN_INSTANCE)."""
    procs = []
    for i in range(REPLICAS):
        name = f"natsconn-{i}"
        procs.append(await stack.enter_async_context(natsconn_process(
            file, log_name=f"{name}.log", env={"NATSCONN_INSTANCE": name})))
    assert len({p.port for p in procs}) == REPLICAS
    return procs


async def _stop_all(procs: list[NatsconnProcess]) -> None:
    for p in procs:
        p.signal(signal.SIGTERM)
    for p in procs:
        assert await p.wait_exit(40) == 0, p.log()


async def _shares(procs: list[NatsconnProcess], pipeline: str) -> list[tuple[float, float]]:
    """(messages read, messages written) of each process, from its own /metrics."""
    out = []
    for p in procs:
        metrics = await p.metrics()
        out.append((metrics.get((IN, pipeline), 0.0), metrics.get((OUT, pipeline), 0.0)))
    return out


def _assert_each_took_a_share(shares: list[tuple[float, float]]) -> None:
    written = [w for _r, w in shares]
    assert all(w > 0 for w in written), f"a replica wrote nothing: {shares}"
    # No crash, no redelivery: what was read once was written once, in total N.
    assert sum(written) == N, f"written {sum(written)} for {N} messages: {shares}"
    assert sum(r for r, _w in shares) == N, f"read {shares} for {N} messages"


async def test_three_replicas_share_one_jetstream_durable(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    source, target, durable = f"SCALE_IN_{unique}", f"SCALE_OUT_{unique}", f"scale-{unique}"
    pipeline = f"scale-js-{unique}"
    await create_stream(nc, source, [f"scalein.{unique}.>"])
    await create_stream(nc, target, [f"scaleout.{unique}.>"])
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                   "durable": durable},
        "sink": {"type": "jetstream", "servers": [nats_url], "stream": target,
                 "subject": f"scaleout.{unique}.{{subject[2]}}", "dedupe": False},
    }])
    async with AsyncExitStack() as stack:
        procs = await _start_replicas(stack, file)
        # Published once all three pull from the one durable, so that all can take part.
        await publish_js(nc, f"scalein.{unique}.orders", N)
        await wait_stream_count(nc, target, N, timeout=180)
        await wait_consumer_drained(nc, source, durable, timeout=60)
        shares = await _shares(procs, pipeline)
        await _stop_all(procs)

    info = await consumer_info(nc, source, durable)
    assert info.num_redelivered == 0, info
    out = await read_stream(nc, target)
    assert_exactly([seq_of(m.data) for m in out], N, f"stream {target}")
    _assert_each_took_a_share(shares)
    print(f"shares (read, written) per replica: {shares}")


_ASSIGNED = re.compile(r"kafka: (\d+) partition\(s\) assigned")
PARTITIONS = 6


def _assigned(proc: NatsconnProcess) -> int | None:
    found = _ASSIGNED.findall(proc.log())
    return int(found[-1]) if found else None


async def test_three_replicas_share_one_kafka_consumer_group(
        nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topic, target, pipeline = f"scale-{unique}", f"SCALE_KOUT_{unique}", f"scale-kafka-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    await create_stream(nc, target, [f"scalekout.{unique}.>"])
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topics": [topic],
                   "group_id": f"natsconn-scale-{unique}", "session_timeout": "6s",
                   "heartbeat_interval": "1s"},
        "sink": {"type": "jetstream", "servers": [nats_url], "stream": target,
                 "subject": f"scalekout.{unique}.x", "dedupe": False},
    }])
    async with AsyncExitStack() as stack:
        procs = await _start_replicas(stack, file)

        def settled() -> bool:
            # The last logged assignments add up only once the final generation of the
            # group is in place (an older one gave someone more partitions).
            counts = [c for c in (_assigned(p) for p in procs) if c]
            return len(counts) == REPLICAS and sum(counts) == PARTITIONS

        await wait_until(settled, 60, "six partitions split among the three replicas")
        # Produced once the group is stable: no rebalance while messages are in flight.
        await produce(kafka_bootstrap, topic, N, key=lambda i: b"k%d" % (i % 600))
        await wait_stream_count(nc, target, N, timeout=180)
        shares = await _shares(procs, pipeline)
        assignment = [_assigned(p) for p in procs]
        await _stop_all(procs)

    out = await read_stream(nc, target)
    assert_exactly([seq_of(m.data) for m in out], N, f"stream {target}")
    _assert_each_took_a_share(shares)
    print(f"partitions per replica {assignment}; shares (read, written) {shares}")
