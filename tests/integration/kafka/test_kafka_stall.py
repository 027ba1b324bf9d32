"""Issue 17 item 2: the Kafka sink and the Kafka source behind a TCP proxy that
stalls (connections open, no byte moves: a hung broker, a black-holed route) and
cuts (every connection aborted) mid-stream.

A Kafka client connects to the bootstrap address only for the first metadata
request and then follows the addresses the brokers advertise, so a proxy in
front of the ordinary listener (9092) is bypassed after the bootstrap. The test
broker of ``scripts/services`` therefore has a listener PROXIED on 127.0.0.1:9095
that advertises 127.0.0.1:19095: the proxy here listens on that fixed port and
forwards to 9095, and every connection the client makes (bootstrap, partition
leader, group coordinator) goes through it. No ``broker_address_map`` is used.

Each test runs ``natsconn run`` as a child process while the test feeds its
source at a fixed rate, injects the fault when a fifth of the messages has
arrived, and reads the output topic back straight from 9092 as it fills. It
asserts that nothing is lost and that the process's RSS stays flat, and prints
the duplicates (the sink does not deduplicate) and the time to recover (from
the end of the fault to the first new message, and until the output caught up
with everything fed before the fault ended). The figures are in
docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from nats.aio.client import Client as NATS

from connector.testing.proxy import TcpProxy

from ..helpers import (
    NatsconnProcess,
    create_stream,
    natsconn_process,
    payload,
    pipeline_file,
    seq_of,
    wait_until,
)
from .kafka_helpers import create_topic

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
PROXIED_PORT = int(os.environ.get("KAFKA_PROXIED_PORT", "9095"))
ADVERTISED_PORT = int(os.environ.get("KAFKA_PROXIED_ADVERTISED_PORT", "19095"))

N = 6000  # messages per test
RATE = 400  # fed per second: the feed lasts 15 s, the fault happens inside it
REQUEST_TIMEOUT = 3.0  # the plugin's request_timeout: the stall outlasts it 4 times
STALL = 12.0
SESSION_TIMEOUT = 6.0  # the source's group session: the stall outlasts it too
RSS_GROWTH_LIMIT = 30 * 2**20
FLOW: dict[str, Any] = {
    "batch": {"max_messages": 50, "max_wait": "10ms"}, "max_in_flight": 2,
    "retry": {"initial_backoff": "100ms", "max_backoff": "2s"},
}


# ---------------------------------------------------------------------- plumbing


@pytest.fixture
async def kafka_proxy(kafka_bootstrap: str) -> AsyncIterator[TcpProxy]:
    """The proxy at the PROXIED listener's advertised address."""
    with socket.socket() as s:
        s.settimeout(2)
        if s.connect_ex((HOST, PROXIED_PORT)) != 0:
            pytest.fail(f"no Kafka PROXIED listener on {HOST}:{PROXIED_PORT}: the broker was "
                        "started by an older scripts/services; `scripts/services start kafka` "
                        "restarts it with one")
    proxy = await TcpProxy(HOST, PROXIED_PORT, listen_port=ADVERTISED_PORT).start()
    try:
        yield proxy
    finally:
        await proxy.close()


@dataclass
class TopicReader:
    """Reads a topic from the beginning, straight from the broker (not through the
    proxy), while the test runs: the sequence numbers and when each first came."""

    bootstrap: str
    topic: str
    partitions: int = 3
    seqs: list[int] = field(default_factory=list)
    first_seen: dict[int, float] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)  # monotonic time of every record
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TopicReader:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        consumer.assign([TopicPartition(self.topic, p) for p in range(self.partitions)])
        self._task = asyncio.create_task(self._run(consumer))
        return self

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                got = await consumer.getmany(timeout_ms=200)
                now = time.monotonic()
                for records in got.values():
                    for r in records:
                        seq = seq_of(r.value or b"")
                        self.seqs.append(seq)
                        self.arrivals.append(now)
                        self.first_seen.setdefault(seq, now)
        finally:
            await consumer.stop()

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def distinct(self) -> int:
        return len(self.first_seen)

    def after(self, t: float) -> int:
        """Records that arrived after ``t``."""
        return sum(1 for a in self.arrivals if a > t)


@dataclass
class Figures:
    cell: str
    lost: int = 0
    duplicated: int = 0
    first_after: float = float("nan")  # fault over -> first new record at the sink
    caught_up: float = float("nan")  # fault over -> everything fed by then delivered
    rss_before: int = 0
    rss_max: int = 0
    rss_after: int = 0
    connections: int = 0
    retries: float = 0.0  # natsconn_retries_total: failed writes the engine retried
    seconds: float = 0.0
    note: str = ""

    def line(self) -> str:
        mib = 2**20
        return (f"{self.cell}: sent {N} lost {self.lost} duplicated {self.duplicated}; "
                f"recovered: first record {self.first_after:.1f}s, caught up "
                f"{self.caught_up:.1f}s after the fault; RSS {self.rss_before / mib:.1f} -> "
                f"max {self.rss_max / mib:.1f} -> {self.rss_after / mib:.1f} MiB; "
                f"{self.connections} proxied connections; {self.retries:.0f} engine retries; "
                f"{self.seconds:.0f}s; {self.note}")


class RssSampler:
    def __init__(self, proc: NatsconnProcess) -> None:
        self.proc = proc
        self.samples: list[int] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            while True:
                self.samples.append(self.proc.rss_bytes())
                await asyncio.sleep(0.25)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _fault(kind: str, proxy: TcpProxy, reader: TopicReader, figures: Figures) -> float:
    """Inject the fault; returns when it ended (monotonic)."""
    if kind == "stall":
        proxy.stall()
        at = reader.distinct
        await asyncio.sleep(STALL)
        # While stalled nothing new may reach the sink's topic except what was
        # already on its way: proof that every connection goes through the proxy.
        held = reader.distinct - at
        proxy.resume()
        figures.note = f"stalled {STALL:g}s at {at} delivered ({held} more arrived meanwhile)"
        return time.monotonic()
    assert kind == "cut"
    at = reader.distinct
    proxy.cut()
    await wait_until(lambda: reader.distinct >= at + N // 5, 60, "progress after the first cut")
    proxy.cut()
    figures.note = f"cut at {at} and {reader.distinct} delivered"
    return time.monotonic()


async def _run_cell(kind: str, file: Path, feed: asyncio.Task[None], proxy: TcpProxy,
                    reader: TopicReader, figures: Figures, fed: list[int]) -> None:
    started = time.monotonic()
    async with natsconn_process(file, env={"NATSCONN_INSTANCE": "kafka-stall"}) as proc:
        rss = RssSampler(proc)
        try:
            await wait_until(lambda: reader.distinct >= N // 5, 60, "a fifth delivered")
            figures.rss_before = proc.rss_bytes()
            ended = await _fault(kind, proxy, reader, figures)
            due = fed[0]  # fed by the end of the fault
            await wait_until(lambda: reader.after(ended) > 0, 60, "a record after the fault")
            figures.first_after = min(a for a in reader.arrivals if a > ended) - ended
            await wait_until(lambda: all(s in reader.first_seen for s in range(due)), 120,
                             f"the {due} messages fed before the fault ended")
            figures.caught_up = max(0.0, max(reader.first_seen[s] for s in range(due)) - ended)
            await feed
            await wait_until(lambda: reader.distinct >= N, 120, f"all {N} messages")
            await asyncio.sleep(3)  # late duplicates
            figures.rss_after = proc.rss_bytes()
            figures.retries = sum(v for (name, _), v in (await proc.metrics()).items()
                                  if name == "natsconn_retries_total")
        finally:
            await rss.stop()
        figures.rss_max = max(rss.samples, default=0)
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0, proc.log()
    figures.seconds = time.monotonic() - started
    figures.connections = proxy.accepted
    seqs = reader.seqs
    figures.lost = len(set(range(N)) - set(seqs))
    figures.duplicated = len(seqs) - len(set(seqs))
    print(figures.line())
    assert figures.lost == 0, figures.line()
    assert set(seqs) <= set(range(N)), "foreign records in the output topic"
    assert figures.rss_max - figures.rss_before < RSS_GROWTH_LIMIT, figures.line()


# ---------------------------------------------------------------------- the sink


@pytest.mark.parametrize("kind", ["stall", "cut"])
async def test_kafka_sink_behind_a_stalled_or_cut_proxy(
        kind: str, kafka_proxy: TcpProxy, kafka_bootstrap: str, nc: NATS, unique: str,
        tmp_path: Path) -> None:
    """JetStream → Kafka, the sink through the proxy: a stall of four request
    timeouts, or two cuts; nothing is lost, RSS stays flat."""
    topic, stream, subject = f"kstall-out-{unique}", f"KSTALL_{unique}", f"kstall.{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    await create_stream(nc, stream, [subject])
    file = pipeline_file(tmp_path, [{
        "name": f"kstall-sink-{unique}",
        # ack_wait above the stall: duplicates from redelivery belong to item 1.
        "source": {"type": "jetstream", "servers": [os.environ.get(
            "NATS_URL", "nats://127.0.0.1:4222")], "stream": stream, "ack_wait": "30s"},
        "sink": {"type": "kafka", "bootstrap_servers": [f"{HOST}:{ADVERTISED_PORT}"],
                 "topic": topic, "request_timeout": f"{REQUEST_TIMEOUT:g}s"},
        **FLOW}], shutdown_timeout="20s")
    fed = [0]

    async def feed() -> None:
        js = nc.jetstream()
        start = time.monotonic()
        for i in range(N):
            await js.publish(subject, payload(i))
            fed[0] = i + 1
            ahead = start + (i + 1) / RATE - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)

    figures = Figures(f"JetStream -> Kafka (sink proxied) / {kind}")
    async with TopicReader(kafka_bootstrap, topic) as reader:
        task = asyncio.create_task(feed())
        try:
            await _run_cell(kind, file, task, kafka_proxy, reader, figures, fed)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(stream)


# ---------------------------------------------------------------------- the source


@pytest.mark.parametrize("kind", ["stall", "cut"])
async def test_kafka_source_behind_a_stalled_or_cut_proxy(
        kind: str, kafka_proxy: TcpProxy, kafka_bootstrap: str, unique: str,
        tmp_path: Path) -> None:
    """Kafka → Kafka, the source through the proxy (fetches, commits, heartbeats and
    the group coordinator all proxied), the sink straight to 9092: a stall longer
    than the request timeout and the group session, or two cuts."""
    src, out = f"kstall-in-{unique}", f"kstall-out-{unique}"
    await create_topic(kafka_bootstrap, src, partitions=3)
    await create_topic(kafka_bootstrap, out, partitions=3)
    file = pipeline_file(tmp_path, [{
        "name": f"kstall-src-{unique}",
        "source": {"type": "kafka", "bootstrap_servers": [f"{HOST}:{ADVERTISED_PORT}"],
                   "topics": [src], "request_timeout": f"{REQUEST_TIMEOUT:g}s",
                   "session_timeout": f"{SESSION_TIMEOUT:g}s", "heartbeat_interval": "1s",
                   "commit_interval": "500ms"},
        "sink": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topic": out},
        **FLOW}], shutdown_timeout="20s")
    fed = [0]

    async def feed() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            start = time.monotonic()
            step = 20
            for first in range(0, N, step):
                futures = [await producer.send(src, payload(i))
                           for i in range(first, first + step)]
                await asyncio.gather(*futures)
                fed[0] = first + step
                ahead = start + (first + step) / RATE - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            await producer.stop()

    figures = Figures(f"Kafka (source proxied) -> Kafka / {kind}")
    async with TopicReader(kafka_bootstrap, out) as reader:
        task = asyncio.create_task(feed())
        try:
            await _run_cell(kind, file, task, kafka_proxy, reader, figures, fed)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
