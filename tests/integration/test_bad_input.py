"""Bad input from outside, against the real servers: each is a clear error or a
dead-lettered message with its reason, never a crash, a hang or a silent drop.

* Frames a server sends that are garbled on the way (``TcpProxy.corrupt``: 16
  bytes inverted in the middle of a chunk going to natsconn), on the sink's
  connection to JetStream, Redis, PostgreSQL and Kafka, mid-stream: the client
  sees a protocol error, the connection is dropped and made again, the batch is
  retried, and every message arrives (no duplicate where the sink dedupes).
* A Kafka record with a 1 MiB header (JetStream takes 64 KiB of headers) and one
  whose key is not UTF-8, routed by ``{key}``: both dead-lettered with the
  reason, the rest flow on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.aio.client import Client as NATS

from connector.testing.proxy import TcpProxy
from connector.testing.servers import host_port

from .helpers import (
    Collector,
    create_stream,
    payload,
    pipeline_file,
    publish_js,
    read_stream,
    run_in_process,
    seq_of,
    wait_ready_in_process,
    wait_until,
)
from .kafka.kafka_helpers import read_topic, topic_count

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

N = 2000


# ------------------------------------------------------------ garbled frames


class Sink:
    """Where one sink writes, through ``address`` (the proxy), and how to read it."""

    def __init__(self, kind: str, unique: str, urls: dict[str, str]) -> None:
        self.kind, self.unique, self.urls = kind, unique, urls
        self.server = host_port("nats" if kind == "jetstream" else kind, urls[kind])

    def options(self, address: str) -> dict[str, Any]:
        u = self.unique
        if self.kind == "jetstream":
            return {"type": "jetstream", "servers": [f"nats://{address}"],
                    "subject": f"gout.{u}", "stream": f"GOUT_{u}",
                    "stream_subjects": [f"gout.{u}"]}
        if self.kind == "redis":
            return {"type": "redis_stream", "url": f"redis://{address}/0",
                    "stream": f"gout:{u}", "socket_timeout": 5}
        if self.kind == "postgres":
            dsn = self.urls["postgres"].replace(":".join(map(str, self.server)), address)
            # a garbled length field leaves the client waiting for bytes that never
            # come: command_timeout (default statement_timeout + 10 s) ends the wait
            return {"type": "postgres", "dsn": dsn, "table": f"gout_{u}", "create_table": True,
                    "command_timeout": 5}
        return {"type": "kafka", "bootstrap_servers": [address], "topic": f"gout-{u}",
                "broker_address_map": {self.urls["kafka"]: address}}

    async def seqs(self, nc: NATS) -> list[int]:
        u = self.unique
        if self.kind == "jetstream":
            try:
                return [seq_of(m.data) for m in await read_stream(nc, f"GOUT_{u}")]
            except Exception:
                return []
        if self.kind == "redis":
            r = aioredis.Redis.from_url(self.urls["redis"])
            try:
                return [seq_of(f[b"data"]) for _, f in await r.xrange(f"gout:{u}")]
            finally:
                await r.aclose()
        if self.kind == "postgres":
            conn = await asyncpg.connect(self.urls["postgres"])
            try:
                return [seq_of(bytes(r["data"])) for r in
                        await conn.fetch(f'SELECT data FROM "gout_{u}"')]
            except asyncpg.UndefinedTableError:
                return []
            finally:
                await conn.close()
        count = await topic_count(self.urls["kafka"], f"gout-{u}")  # 0: no topic yet
        if count == 0:
            return []
        return [seq_of(r.value or b"")
                for r in await read_topic(self.urls["kafka"], f"gout-{u}", count)]


@pytest.fixture
def urls(nats_url: str, kafka_bootstrap: str, redis_url: str, postgres_dsn: str
         ) -> dict[str, str]:
    return {"jetstream": nats_url, "kafka": kafka_bootstrap, "redis": redis_url,
            "postgres": postgres_dsn}


@pytest.mark.parametrize("kind", ["jetstream", "redis", "postgres", "kafka"])
async def test_garbled_frames_from_the_sinks_server_lose_nothing(
        nc: NATS, nats_url: str, urls: dict[str, str], unique: str, kind: str,
        tmp_path: Path) -> None:
    sink = Sink(kind, unique, urls)
    source = f"GIN_{unique}"
    await create_stream(nc, source, [f"gin.{unique}"])
    await publish_js(nc, f"gin.{unique}", N)
    proxy = await TcpProxy(*sink.server, delay=0.01).start()  # paced: faults land mid-stream
    file = pipeline_file(tmp_path, [{
        "name": f"garbled-{unique}",
        "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                   "durable": f"g-{unique}", "ack_wait": "30s"},
        "sink": sink.options(proxy.address),
        "batch": {"max_messages": 10, "max_wait": "10ms"}, "max_in_flight": 2,
        "retry": {"initial_backoff": "100ms", "max_backoff": "1s"},
    }])
    arrived: list[int] = []

    async def count() -> int:
        arrived[:] = await sink.seqs(nc)
        return len(set(arrived))

    try:
        async with run_in_process(file, stop_timeout=20) as supervisor:
            await wait_ready_in_process(supervisor, 60)
            garbled = 0
            for at in (N // 5, 2 * N // 5, 3 * N // 5):  # three times, mid-stream
                await wait_until(_reached(count, at), 60, f"{at} messages at the {kind} sink")
                before = proxy.corrupted
                proxy.corrupt(1)
                await wait_until(lambda b=before: proxy.corrupted > b, 30,
                                 "a chunk from the server garbled")
                garbled += 1
            await wait_until(_reached(count, N), 120, f"all {N} messages at the {kind} sink")
            assert supervisor.ready()[0], supervisor.ready()[1]  # still running, not failed
    finally:
        await proxy.close()
    assert set(arrived) == set(range(N)), f"lost: {sorted(set(range(N)) - set(arrived))[:20]}"
    assert garbled == 3 and proxy.corrupted == 3
    # the garbled connections were given up and made again
    assert proxy.accepted >= 2, proxy.accepted
    if kind in ("jetstream", "postgres"):  # these dedupe by the source's id
        assert len(arrived) == N, f"{len(arrived) - N} duplicates"


def _reached(count: Callable[[], Awaitable[int]], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await count() >= n
    return check


# ------------------------------------------------------------ Kafka records


async def _run_to_jetstream(nc: NATS, nats_url: str, tmp_path: Path, name: str,
                            source: dict[str, Any], subject: str, stream: str, dlq: str,
                            n: int, bad: int) -> Collector:
    """Run ``source`` -> JetStream with a NATS dead letter until ``bad`` letters
    came and the other ``n - bad`` messages are stored; the letters collected."""
    letters = await Collector.subscribe(nc, dlq)
    file = pipeline_file(tmp_path, [{
        "name": name,
        "source": source,
        "sink": {"type": "jetstream", "servers": [nats_url], "subject": subject},
        "dead_letter": {"type": "nats", "servers": [nats_url], "subject": dlq},
    }])
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor, 60)
        await letters.wait_for(bad, timeout=60)

        async def all_good() -> bool:
            info = await nc.jetstream().stream_info(stream)
            return int(info.state.messages) >= n - bad

        await wait_until(all_good, 60, f"{n - bad} messages in {stream}")
        await asyncio.sleep(1)
    return letters


async def test_huge_header_and_non_utf8_key_are_dead_lettered(
        nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topic, stream, dlq = f"bad-{unique}", f"BAD_{unique}", f"baddl.{unique}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={
            "max.message.bytes": str(4 << 20)})])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=4 << 20)
    await producer.start()
    big, bad_key, n = 50, 60, 200
    try:
        for i in range(n):
            headers = [("big", b"x" * (1 << 20))] if i == big else [("n", b"%d" % i)]
            key = b"\xff\xfe%d" % i if i == bad_key else b"k%d" % i
            await producer.send(topic, payload(i), key=key, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()
    await create_stream(nc, stream, [f"bad.{unique}.>"])
    source = {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topics": [topic],
              "group_id": f"bad-{unique}"}
    letters = await _run_to_jetstream(nc, nats_url, tmp_path, f"bad-{unique}", source,
                                      f"bad.{unique}.{{key}}", stream, dlq, n, 2)
    reasons = {int(m.headers["Natsconn-Source-Id"].rsplit("/", 1)[1]):
               m.headers.get("Natsconn-Error", "") for m in letters.messages if m.headers}
    assert set(reasons) == {big, bad_key}, reasons
    assert "header size exceeds" in reasons[big], reasons
    assert "key is not valid UTF-8" in reasons[bad_key], reasons
    good = sorted(seq_of(m.data) for m in await read_stream(nc, stream))
    assert good == [i for i in range(n) if i not in (big, bad_key)]


# ------------------------------------------------------------ Redis entries


async def test_redis_header_that_is_not_utf8_is_dead_lettered_by_a_nats_sink(
        nc: NATS, nats_url: str, redis_url: str, unique: str, tmp_path: Path) -> None:
    """A Redis stream entry with a header field that is not UTF-8 reaches the
    JetStream sink as text NATS cannot carry: that one message is dead-lettered
    with the reason and the header escaped (so that the NATS dead-letter target
    can carry it), and the rest are stored. Before: the source replaced the bytes
    with U+FFFD and the sink stored altered headers without a word."""
    src, stream, dlq, n, bad = f"badr:{unique}", f"BADR_{unique}", f"badrdl.{unique}", 50, 20
    r = aioredis.Redis.from_url(redis_url)
    try:
        for i in range(n):
            value = b"\xff\xfe" if i == bad else b"%d" % i
            await r.xadd(src, {b"data": payload(i), b"h": value})
    finally:
        await r.aclose()
    await create_stream(nc, stream, [f"badr.{unique}"])
    source = {"type": "redis_stream", "url": redis_url, "streams": [src], "group": "g"}
    letters = await _run_to_jetstream(nc, nats_url, tmp_path, f"badr-{unique}", source,
                                      f"badr.{unique}", stream, dlq, n, 1)
    [letter] = letters.messages
    assert seq_of(letter.data) == bad
    assert "header NATS cannot carry" in (letter.headers or {}).get("Natsconn-Error", "")
    assert (letter.headers or {}).get("h") == "\\xff\\xfe"
    stored = await read_stream(nc, stream)
    assert sorted(seq_of(m.data) for m in stored) == [i for i in range(n) if i != bad]
    assert all((m.headers or {}).get("h") == str(seq_of(m.data)) for m in stored)
