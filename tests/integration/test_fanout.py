"""Issue 13, fan-out and routing against the real servers.

* JetStream → {Kafka, PostgreSQL}, 100,000 messages, ``kill -9`` of ``natsconn
  run`` half way and a restart: PostgreSQL holds every message exactly once
  (upsert on the source id), Kafka every message at least once; the Kafka
  duplicates are counted and printed.
* The same fan-out with the PostgreSQL sink stalled (a TCP proxy that stops
  forwarding): the Kafka sink keeps writing until the pipeline's in-flight
  window is full, then stops; the window holds, RSS stays flat; after the
  stall both sinks drain and hold every message.
* ``route: switch`` by subject to two Kafka topics: each topic holds exactly
  its messages, once.

Payloads are ``{"seq": N}`` (padded in the stall test) so every message names
itself: the checks compare sets of sequence numbers, never just counts.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from .helpers import (
    NatsconnProcess,
    assert_all_present,
    assert_exactly,
    create_stream,
    local_metric,
    natsconn_process,
    pipeline_file,
    publish_js,
    run_in_process,
    seq_of,
    wait_consumer_drained,
    wait_ready_in_process,
    wait_until,
)
from .kafka.kafka_helpers import create_topic, read_topic, topic_count

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

# The PostgreSQL sink of these tests: one row per message, keyed by the source id
# (JetStream ``STREAM:seq``), so a redelivered message updates its row instead of
# adding one.
PG_COLUMNS: dict[str, Any] = {
    "id": "id",
    "seq": {"from": "data.seq", "type": "bigint"},
    "subject": "subject",
}


# ------------------------------------------------------------------ fixtures


class Db:
    """The test's own PostgreSQL connection, opened again when the server drops it:
    other runs on this machine may restart the shared server mid-test, and natsconn
    rides that out by its retries; the test's reads must too."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def fetch(self, sql: str, *args: Any, timeout: float = 60.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self.dsn, timeout=10)
                return list(await self._conn.fetch(sql, *args))
            except (asyncpg.InterfaceError, asyncpg.exceptions.OperatorInterventionError,
                    asyncpg.exceptions.CannotConnectNowError, OSError):
                if time.monotonic() > deadline:
                    raise
                await self.close()
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[Db]:
    conn = Db(postgres_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def table(db: Db, unique: str) -> AsyncIterator[str]:
    """A table name for this test; dropped at teardown."""
    name = f"fanout_{unique}"
    yield name
    await db.fetch(f'DROP TABLE IF EXISTS "{name}"')


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """``await topics(name)`` creates a topic of 3 partitions; all deleted at teardown
    (the crash test leaves 100,000 records)."""
    made: list[str] = []

    async def make(name: str) -> str:
        await create_topic(kafka_bootstrap, name, partitions=3)
        made.append(name)
        return name

    yield make
    if made:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics(made)
        finally:
            await admin.close()


# ------------------------------------------------------------------- helpers


def js_source(nats_url: str, stream: str, durable: str, **extra: Any) -> dict[str, Any]:
    return {"type": "jetstream", "servers": [nats_url], "stream": stream, "durable": durable,
            **extra}


def kafka_sink(bootstrap: str, topic: str) -> dict[str, Any]:
    return {"type": "kafka", "bootstrap_servers": [bootstrap], "topic": topic}


def pg_sink(dsn: str, table: str, **extra: Any) -> dict[str, Any]:
    return {"type": "postgres", "dsn": dsn, "table": table, "create_table": True,
            "mode": "upsert", "key_columns": ["id"], "columns": PG_COLUMNS, **extra}


async def sink_metrics(proc: NatsconnProcess, pipeline: str) -> dict[tuple[str, str], float]:
    """``{(sample name, sink label): value}`` of one pipeline of a natsconn process
    (the helpers' ``metrics()`` sums over the sink label)."""
    status, body = await proc.http_get("/metrics")
    assert status == 200, f"/metrics answered {status}"
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.labels.get("pipeline") == pipeline and "sink" in sample.labels:
                out[(sample.name, sample.labels["sink"])] = sample.value
    return out


async def sink_out(proc: NatsconnProcess, pipeline: str, sink: str) -> float:
    return (await sink_metrics(proc, pipeline)).get(("natsconn_sink_messages_out_total", sink),
                                                    0.0)


async def pg_count(db: Db, table: str) -> int:
    if not (await db.fetch("SELECT to_regclass($1) IS NOT NULL AS e", f'"{table}"'))[0]["e"]:
        return 0
    return int((await db.fetch(f'SELECT count(*) AS n FROM "{table}"'))[0]["n"])


async def assert_pg_exactly(db: Db, table: str, stream: str, n: int) -> None:
    """One row per message: each of 0..n-1 once by payload, each id once, and each
    row's id the JetStream id of its message (``STREAM:seq``, seq from 1)."""
    rows = await db.fetch(f'SELECT id, seq FROM "{table}"')
    assert_exactly([r["seq"] for r in rows], n, f"table {table}")
    assert len({r["id"] for r in rows}) == n, "an id holds more than one row"
    wrong = [(r["id"], r["seq"]) for r in rows if r["id"] != f"{stream}:{r['seq'] + 1}"]
    assert not wrong, f"rows whose id is not their message's: {wrong[:5]}"


async def kafka_seqs(bootstrap: str, topic: str) -> list[int]:
    """Every record's sequence number, duplicates included."""
    total = await topic_count(bootstrap, topic)
    return [seq_of(r.value) for r in await read_topic(bootstrap, topic, total)] if total else []


def duplicates(seqs: list[int]) -> tuple[int, int]:
    """(records beyond the first of their sequence number, numbers seen more than once)."""
    seen: dict[int, int] = {}
    for s in seqs:
        seen[s] = seen.get(s, 0) + 1
    return len(seqs) - len(seen), sum(1 for c in seen.values() if c > 1)


# ------------------------------------------------ (a) kill -9 half way, restart

N = 100_000
KILL_AT = N // 2  # both sinks hold at least this many when the kill comes
# Batches of 1000, four writes per sink: a window of 1000 * (4 + 1) = 5000. A short
# ack_wait brings back what the killed process held; the in-progress ticker keeps
# it from expiring under a live process.
CRASH_FLOW: dict[str, Any] = {"batch": {"max_messages": 1000, "max_wait": "20ms"},
                              "max_in_flight": 4, "in_progress_interval": "1s"}


async def test_kill_9_half_way_postgres_exactly_once_kafka_at_least_once(
        nc: NATS, nats_url: str, kafka_bootstrap: str, postgres_dsn: str,
        db: Db, table: str, topics: Any, unique: str, tmp_path: Path) -> None:
    stream, durable, pipeline = f"FO9_{unique}", f"fo9-{unique}", f"fo9-{unique}"
    began = time.monotonic()
    topic = await topics(f"fo9-{unique}")
    await create_stream(nc, stream, [f"fo9.{unique}.>"])
    await publish_js(nc, f"fo9.{unique}.x", N)
    published = time.monotonic() - began
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": js_source(nats_url, stream, durable, ack_wait="3s"),
        "sinks": [{"name": "kafka", "sink": kafka_sink(kafka_bootstrap, topic)},
                  {"name": "postgres", "sink": pg_sink(postgres_dsn, table)}],
        **CRASH_FLOW,
    }])

    # Run 1, killed once both sinks have written half of the messages.
    async with natsconn_process(file, log_name="run1.log") as proc:
        counts: dict[str, float] = {}

        async def half_way() -> bool:
            for sink in ("kafka", "postgres"):
                counts[sink] = await sink_out(proc, pipeline, sink)
            return min(counts.values()) >= KILL_AT

        await wait_until(half_way, 90, f"{KILL_AT} messages in each sink", 0.02)
        proc.signal(signal.SIGKILL)
        assert await proc.wait_exit(10) == -signal.SIGKILL
    run1 = time.monotonic() - began - published
    kafka_at_kill = await topic_count(kafka_bootstrap, topic)
    pg_at_kill = await pg_count(db, table)
    print(f"\n[fan-out kill -9] killed with {kafka_at_kill} records in Kafka, {pg_at_kill} "
          f"rows in PostgreSQL (metrics last said {counts})")
    assert KILL_AT <= kafka_at_kill < N and KILL_AT <= pg_at_kill < N, (
        f"not killed half way: Kafka {kafka_at_kill}, PostgreSQL {pg_at_kill} of {N}")

    # Run 2: to the end. Every message acknowledged at the source means (when the
    # ack waits for every sink) that both sinks confirmed it: check them then, so a
    # loss shows as the messages missing rather than as a wait running out.
    restarted = time.monotonic()
    async with natsconn_process(file, log_name="run2.log") as proc:
        await wait_consumer_drained(nc, stream, durable, 120)
        after = await sink_metrics(proc, pipeline)
    run2 = time.monotonic() - restarted

    await assert_pg_exactly(db, table, stream, N)
    seqs = await kafka_seqs(kafka_bootstrap, topic)
    assert_all_present(seqs, N, f"topic {topic}")
    assert set(seqs) == set(range(N)), f"topic {topic} holds unexpected sequence numbers"
    extra, twice = duplicates(seqs)
    pg_again = after[("natsconn_sink_messages_out_total", "postgres")] - (N - pg_at_kill)
    kafka_again = after[("natsconn_sink_messages_out_total", "kafka")] - (N - kafka_at_kill)
    print(f"[fan-out kill -9] N={N}: published in {published:.1f}s, run 1 {run1:.1f}s to the "
          f"kill, run 2 {run2:.1f}s to the end. Kafka: {len(seqs)} records, {extra} "
          f"duplicates ({twice} messages written more than once; run 2 wrote "
          f"{kafka_again:.0f} it already had). PostgreSQL: {N} rows, each id once; run 2 "
          f"upserted {pg_again:.0f} rows it already had. {time.monotonic() - began:.1f}s "
          "in all")
    # What run 2 wrote again to Kafka is exactly what the topic holds twice.
    assert extra == kafka_again, (extra, kafka_again)


async def _kafka_has(bootstrap: str, topic: str, n: int) -> bool:
    return await topic_count(bootstrap, topic) >= n


# -------------------------------------- (b) PostgreSQL stalled, Kafka bounded

MAX_MESSAGES, MAX_IN_FLIGHT = 200, 4
WINDOW = MAX_MESSAGES * (MAX_IN_FLIGHT + 1)  # the engine's bound on read-but-unacked
STALL_N = 30_000  # ~1 KiB each: 30 MiB waiting in the stream behind the window
PAD = b"x" * 1000
SAMPLE_SECONDS = 5.0
RSS_GROWTH_BOUND = 8 * 1024 * 1024  # over the sampling
RSS_ABOVE_IDLE = 20 * 1024 * 1024  # above the process before anything was published


def padded(seq: int) -> bytes:
    return b'{"seq":%d,"pad":"%s"}' % (seq, PAD)


async def test_a_stalled_postgres_sink_holds_kafka_at_the_window_then_both_drain(
        nc: NATS, nats_url: str, kafka_bootstrap: str, postgres_dsn: str,
        db: Db, table: str, topics: Any, unique: str, tmp_path: Path,
        tcp_proxy: Any) -> None:
    stream, durable, pipeline = f"FOST_{unique}", f"fost-{unique}", f"fost-{unique}"
    topic = await topics(f"fost-{unique}")
    await create_stream(nc, stream, [f"fost.{unique}.>"])
    url = urlsplit(postgres_dsn)
    proxy = await tcp_proxy(url.hostname or "127.0.0.1", url.port or 5432)
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        # A small prefetch keeps the source's own read-ahead out of the RSS figures;
        # ack_wait well above the in-progress interval: the stall makes no redelivery.
        "source": js_source(nats_url, stream, durable, ack_wait="30s", prefetch=1000),
        "sinks": [
            {"name": "kafka", "sink": kafka_sink(kafka_bootstrap, topic)},
            # Through the proxy; a stalled write fails after 2 s and is retried.
            {"name": "postgres", "sink": pg_sink(postgres_dsn, table, host=proxy.host,
                                                 port=proxy.port, command_timeout="2s",
                                                 connect_timeout="2s"),
             "retry": {"initial_backoff": "200ms", "max_backoff": "1s"}},
        ],
        "batch": {"max_messages": MAX_MESSAGES, "max_wait": "10ms"},
        "max_in_flight": MAX_IN_FLIGHT,
    }])
    async with natsconn_process(file) as proc:
        # Ready: the PostgreSQL sink has connected and prepared. Now stall it, then
        # publish: every message arrives while PostgreSQL cannot be written.
        rss_idle = proc.rss_bytes()
        proxy.stall()
        await publish_js(nc, f"fost.{unique}.x", STALL_N, data=padded)

        async def kafka_has_the_window() -> bool:
            return await sink_out(proc, pipeline, "kafka") >= WINDOW

        await wait_until(kafka_has_the_window, 60, f"{WINDOW} messages written to Kafka")

        async def retried() -> bool:
            m = await sink_metrics(proc, pipeline)
            return m.get(("natsconn_sink_retries_total", "postgres"), 0) > 0

        # The stalled writes time out and are retried: the stall is under way.
        await wait_until(retried, 30, "a timed-out PostgreSQL write retried")
        samples: list[tuple[float, float, float, int, int]] = []
        started = time.monotonic()
        while time.monotonic() - started < SAMPLE_SECONDS:
            m = await sink_metrics(proc, pipeline)
            samples.append((m.get(("natsconn_sink_messages_out_total", "kafka"), 0.0),
                            await proc.metric("natsconn_in_flight_messages", pipeline),
                            m.get(("natsconn_sink_queued_messages", "postgres"), 0.0),
                            proc.rss_bytes(), await pg_count(db, table)))
            await asyncio.sleep(0.5)
        retries = (await sink_metrics(proc, pipeline))[("natsconn_sink_retries_total",
                                                        "postgres")]
        stalled_for = time.monotonic() - started
        proxy.resume()
        resumed = time.monotonic()
        await wait_consumer_drained(nc, stream, durable, 90)
        drained = time.monotonic() - resumed

    kafka = [s[0] for s in samples]
    in_flight = [s[1] for s in samples]
    rss = [s[3] for s in samples]
    growth = max(rss) - rss[0]
    print(f"\n[fan-out stall] window {WINDOW}: over {stalled_for:.1f}s of stall Kafka held "
          f"{sorted(set(kafka))}, in flight {sorted(set(in_flight))}, PostgreSQL queue "
          f"{sorted({s[2] for s in samples})}, rows {sorted({s[4] for s in samples})}, "
          f"{retries:.0f} PostgreSQL retries; RSS {rss_idle / 2**20:.1f} MiB idle, "
          f"{rss[0] / 2**20:.1f} -> max {max(rss) / 2**20:.1f} MiB (+{growth / 2**20:.1f}) "
          f"through the stall; drained {STALL_N} in "
          f"{drained:.1f}s after the resume")
    # The healthy sink wrote exactly the window and then stopped with the reads.
    assert all(k == WINDOW for k in kafka), f"Kafka sink counts while stalled: {kafka}"
    assert all(f == WINDOW for f in in_flight), f"in flight while stalled: {in_flight}"
    assert all(s[4] == 0 for s in samples), "rows reached PostgreSQL through the stall"
    # Flat through the stall, and not much above the idle process: the 30 MiB behind
    # the window stays in the stream.
    assert growth <= RSS_GROWTH_BOUND, [r // 2**20 for r in rss]
    assert max(rss) - rss_idle <= RSS_ABOVE_IDLE, (rss_idle // 2**20, [r // 2**20 for r in rss])
    await assert_pg_exactly(db, table, stream, STALL_N)
    seqs = await kafka_seqs(kafka_bootstrap, topic)
    # No redelivery happened (the ack deadline was extended all through the stall),
    # so the Kafka sink wrote each message once.
    assert_exactly(seqs, STALL_N, f"topic {topic}")


# ----------------------------------------------- (c) switch by subject to topics

ROUTED_N = 3000
REGIONS = ("eu", "us", "apac")


def region_of(seq: int) -> str:
    return REGIONS[seq % len(REGIONS)]


async def test_switch_routes_by_subject_to_two_topics(
        nc: NATS, nats_url: str, kafka_bootstrap: str, topics: Any, unique: str,
        tmp_path: Path) -> None:
    """``eu`` orders to one topic; everything else to the other. With ``switch`` a
    message takes its first match only: the catch-all sink (no ``when:``) gets no
    ``eu`` order, which ``broadcast`` would have given it too."""
    stream, durable, pipeline = f"FORT_{unique}", f"fort-{unique}", f"fort-{unique}"
    eu_topic, rest_topic = await topics(f"fort-eu-{unique}"), await topics(f"fort-rest-{unique}")
    await create_stream(nc, stream, [f"fort.{unique}.>"])
    await publish_js(nc, lambda i: f"fort.{unique}.{region_of(i)}.created", ROUTED_N)
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": js_source(nats_url, stream, durable),
        "route": "switch",
        "sinks": [{"name": "eu", "when": 'tokens[2] == "eu"',
                   "sink": kafka_sink(kafka_bootstrap, eu_topic)},
                  {"name": "rest", "sink": kafka_sink(kafka_bootstrap, rest_topic)}],
        "batch": {"max_messages": 250, "max_wait": "10ms"},
    }])
    expected: dict[str, Callable[[int], bool]] = {
        eu_topic: lambda i: region_of(i) == "eu",
        rest_topic: lambda i: region_of(i) != "eu",
    }
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await wait_consumer_drained(nc, stream, durable, 60)
        out = {sink: local_metric("natsconn_sink_messages_out_total", pipeline, sink=sink)
               for sink in ("eu", "rest")}
    got: dict[str, list[int]] = {}
    for topic, belongs in expected.items():
        want = [i for i in range(ROUTED_N) if belongs(i)]
        await wait_until(partial(_kafka_has, kafka_bootstrap, topic, len(want)), 30,
                         f"{len(want)} records in {topic}", 0.5)
        got[topic] = await kafka_seqs(kafka_bootstrap, topic)
        assert sorted(got[topic]) == want, (
            f"topic {topic}: {len(got[topic])} records; not its own: "
            f"{sorted(set(got[topic]) - set(want))[:10]}; missing: "
            f"{sorted(set(want) - set(got[topic]))[:10]}")
    assert out == {"eu": len(got[eu_topic]), "rest": len(got[rest_topic])}, out
    print(f"\n[switch] {ROUTED_N} messages: {len(got[eu_topic])} to {eu_topic}, "
          f"{len(got[rest_topic])} to {rest_topic}; sink metrics {out}")
