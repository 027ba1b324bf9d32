"""OpenTelemetry traces across the bridge, against a real collector.

The collector is ``scripts/services start otelcol`` (scripts/lib/services-otelcol.sh):
the OpenTelemetry collector's OTLP receiver and its file exporter, which writes
every span it receives as OTLP JSON to ``$NATSCONN_OTELCOL_SPANS``. Each test
runs ``natsconn run`` as a child process with its own ``OTEL_SERVICE_NAME`` and
finds its spans in that file by it.

* JetStream → Kafka (the issue's must-show): each message published with a
  ``traceparent`` arrives in Kafka with the same one (same trace id, same
  ``tracestate``); the collector holds the ``natsconn write kafka`` spans, and
  every message's context is a link of exactly one of them. Export over OTLP/HTTP.
* core NATS → Redis stream (``header_prefix``) and → PostgreSQL
  (``header.traceparent`` columns), exported over OTLP/gRPC.
* Kafka → JetStream, JetStream → core NATS and Redis stream → JetStream: the
  headers go on from every source.
* An unreachable collector costs the bridge nothing but the spans; an exporter
  natsconn cannot use is an error at startup (exit 2).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from .helpers import (
    NATSCONN,
    Collector,
    create_stream,
    free_port,
    natsconn_process,
    payload,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    wait_stream_count,
    wait_until,
)
from .kafka.kafka_helpers import create_topic, produce, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

STATE = Path(os.environ.get("NATSCONN_STATE")
             or Path(os.environ.get("NATSCONN_CACHE") or Path.home() / ".cache/natsconn")
             / "state")
SPANS = Path(os.environ.get("NATSCONN_OTELCOL_SPANS") or STATE / "otelcol" / "spans.jsonl")
HTTP_URL = os.environ.get("NATSCONN_OTELCOL_HTTP_URL", "http://127.0.0.1:4318")
GRPC_URL = os.environ.get("NATSCONN_OTELCOL_GRPC_URL", "http://127.0.0.1:4317")
SPAN_KIND_CLIENT = 3


# ------------------------------------------------------------------ contexts


@dataclass(frozen=True)
class Context:
    trace_id: str
    span_id: str
    state: str

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-01"

    def headers(self) -> dict[str, str]:
        return {"traceparent": self.traceparent, "tracestate": self.state}


def contexts(count: int, untraced_every: int = 10) -> dict[int, Context | None]:
    """A context of its own for each message but every ``untraced_every``-th."""
    return {i: None if i % untraced_every == 3 else
            Context(secrets.token_hex(16), secrets.token_hex(8), f"natsconn=m{i},vendor=x")
            for i in range(count)}


def header_pairs(ctx: Context | None) -> dict[str, str]:
    return ctx.headers() if ctx else {"X-Untraced": "yes"}


# ------------------------------------------------------------- the collector


@pytest.fixture
def otel_service(unique: str) -> str:
    """The collector is reachable (else the test fails, with the command to start
    it); the test's own service name."""
    for url in (HTTP_URL, GRPC_URL):
        parts = urlsplit(url)
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=2).close()
        except OSError as exc:
            pytest.fail(f"no OpenTelemetry collector at {url} ({exc}); start it with "
                        "`scripts/services start otelcol`", pytrace=False)
    return f"natsconn-test-{unique}"


def otel_env(service: str, protocol: str = "http/protobuf") -> dict[str, str]:
    return {
        "OTEL_SERVICE_NAME": service,
        "OTEL_EXPORTER_OTLP_ENDPOINT": GRPC_URL if protocol == "grpc" else HTTP_URL,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach the collector while the test runs
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_SDK_DISABLED": "false",
    }


def _value(v: Mapping[str, Any]) -> Any:
    if "intValue" in v:
        return int(v["intValue"])
    return next(iter(v.values()), None)


def collected_spans(service: str) -> list[dict[str, Any]]:
    """Every span the collector wrote for ``service``, attributes as a dict."""
    out: list[dict[str, Any]] = []
    for path in sorted(SPANS.parent.glob(f"{SPANS.stem}*{SPANS.suffix}")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if service not in line:
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:  # the line being written
                continue
            for rs in doc.get("resourceSpans", []):
                resource = {a["key"]: _value(a["value"])
                            for a in rs.get("resource", {}).get("attributes", [])}
                if resource.get("service.name") != service:
                    continue
                for ss in rs.get("scopeSpans", []):
                    for span in ss.get("spans", []):
                        span["attrs"] = {a["key"]: _value(a["value"])
                                         for a in span.get("attributes", [])}
                        out.append(span)
    return out


def write_spans(service: str, sink: str) -> list[dict[str, Any]]:
    return [s for s in collected_spans(service) if s["name"] == f"natsconn write {sink}"]


async def wait_spans(service: str, sink: str, messages: int,
                     timeout: float = 15.0) -> list[dict[str, Any]]:
    """The write spans of ``sink`` once they account for ``messages`` messages."""
    await wait_until(
        lambda: sum(s["attrs"]["messaging.batch.message_count"]
                    for s in write_spans(service, sink)) >= messages,
        timeout, f"spans 'natsconn write {sink}' of {messages} messages in {SPANS}")
    return write_spans(service, sink)


def assert_linked(spans: list[dict[str, Any]], expected: Mapping[int, Context | None],
                  pipeline: str) -> None:
    """Each span is a CLIENT root span of ``pipeline`` whose links are distinct, and
    the spans together link every traced message's context once (no other)."""
    linked: list[tuple[str, str]] = []
    for span in spans:
        assert span["kind"] == SPAN_KIND_CLIENT, span
        assert not span.get("parentSpanId"), span
        assert span["attrs"]["natsconn.pipeline"] == pipeline
        assert span.get("status", {}).get("code") in (None, 0, "STATUS_CODE_UNSET"), span
        links = [(li["traceId"], li["spanId"]) for li in span.get("links", [])]
        assert len(links) == len(set(links)), f"a span links a context twice: {span}"
        linked.extend(links)
    want = sorted((c.trace_id, c.span_id) for c in expected.values() if c)
    assert sorted(linked) == want, (f"{len(linked)} links for {len(want)} traced messages; "
                                    f"missing {len(set(want) - set(linked))}")
    assert sum(s["attrs"]["messaging.batch.message_count"] for s in spans) == len(expected)


async def stop(proc: Any) -> None:
    """SIGTERM: the graceful stop, which also flushes the spans still queued."""
    proc.signal(signal.SIGTERM)
    assert await proc.wait_exit(20) == 0, proc.log()


# --------------------------------------------------------------------- tests


async def test_jetstream_to_kafka_keeps_the_trace_and_links_the_write_span(
    tmp_path: Path, nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str,
    otel_service: str,
) -> None:
    n = 300
    stream, subject, topic = f"TRACE_{unique}", f"trace.{unique}", f"trace_{unique}"
    pipeline = f"js_kafka_{unique}"
    sent = contexts(n)
    await create_stream(nc, stream, [subject])
    await create_topic(kafka_bootstrap, topic, partitions=1)
    await publish_js(nc, subject, n, headers=lambda i: header_pairs(sent[i]))
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": stream,
                   "durable": f"d_{unique}"},
        "sink": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topic": topic},
        "batch": {"max_messages": 64, "max_wait": "20ms"},
    }])
    async with natsconn_process(file, env=otel_env(otel_service)) as proc:
        records = await read_topic(kafka_bootstrap, topic, n, timeout=20)
        await stop(proc)

    assert len(records) == n
    for record in records:
        seq = seq_of(record.value)
        headers = {k: v.decode() for k, v in record.headers}
        ctx = sent[seq]
        if ctx is None:
            assert "traceparent" not in headers and headers["X-Untraced"] == "yes"
            continue
        assert headers["traceparent"] == ctx.traceparent, f"message {seq}"
        assert headers["traceparent"].split("-")[1] == ctx.trace_id  # the same trace id
        assert headers["tracestate"] == ctx.state

    # Flushed at the stop: every span is in the collector's file already.
    spans = await wait_spans(otel_service, "kafka", n, timeout=5)
    assert_linked(spans, sent, pipeline)
    first = sent[0]
    assert first is not None
    (holder,) = [s for s in spans
                 if any(li["traceId"] == first.trace_id and li["spanId"] == first.span_id
                        for li in s.get("links", []))]
    assert holder["attrs"]["natsconn.sink"] == "kafka"
    assert holder["attrs"]["messaging.operation.type"] == "send"
    assert int(holder["endTimeUnixNano"]) >= int(holder["startTimeUnixNano"])


async def test_nats_to_redis_stream_and_postgres_over_grpc(
    tmp_path: Path, nc: NATS, nats_url: str, redis_url: str, postgres_dsn: str, unique: str,
    otel_service: str,
) -> None:
    n = 120
    redis_key, table = f"it:{unique}:traced", f"traced_{unique}"
    sent = contexts(n)
    file = pipeline_file(tmp_path, [
        {"name": f"nats_redis_{unique}",
         "source": {"type": "nats", "servers": [nats_url], "subjects": [f"tr.r.{unique}"]},
         "sink": {"type": "redis_stream", "url": redis_url, "stream": redis_key,
                  "header_prefix": "h:"},
         "batch": {"max_messages": 50, "max_wait": "20ms"}},
        {"name": f"nats_pg_{unique}",
         "source": {"type": "nats", "servers": [nats_url], "subjects": [f"tr.p.{unique}"]},
         "sink": {"type": "postgres", "dsn": postgres_dsn, "table": table,
                  "create_table": True,
                  "columns": {"seq": {"from": "data.seq", "type": "bigint"},
                              "traceparent": "header.traceparent",
                              "tracestate": "header.tracestate"}},
         "batch": {"max_messages": 50, "max_wait": "20ms"}},
    ])
    r = aioredis.Redis.from_url(redis_url)
    db = await asyncpg.connect(postgres_dsn)
    try:
        async with natsconn_process(file, env=otel_env(otel_service, "grpc")) as proc:
            for i in range(n):
                for where in ("r", "p"):
                    await nc.publish(f"tr.{where}.{unique}", payload(i),
                                     headers=header_pairs(sent[i]))
            await nc.flush()

            async def landed() -> bool:
                exists = await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
                rows = await db.fetchval(f'SELECT count(*) FROM "{table}"') if exists else 0
                return bool(await r.xlen(redis_key) >= n and rows >= n)

            await wait_until(landed, 20, f"{n} entries in {redis_key} and rows in {table}")
            await stop(proc)

        entries = await r.xrange(redis_key)
        assert len(entries) == n
        for _id, fields in entries:
            ctx = sent[seq_of(fields[b"data"])]
            if ctx is None:
                assert b"h:traceparent" not in fields
                assert fields[b"h:X-Untraced"] == b"yes"
            else:
                assert fields[b"h:traceparent"].decode() == ctx.traceparent
                assert fields[b"h:tracestate"].decode() == ctx.state
        rows = await db.fetch(f'SELECT seq, traceparent, tracestate FROM "{table}"')
        assert len(rows) == n
        for row in rows:
            ctx = sent[row["seq"]]
            assert row["traceparent"] == (ctx.traceparent if ctx else None)
            assert row["tracestate"] == (ctx.state if ctx else None)
    finally:
        await db.execute(f'DROP TABLE IF EXISTS "{table}"')
        await db.close()
        await r.delete(redis_key)
        await r.aclose()

    assert_linked(await wait_spans(otel_service, "redis_stream", n, timeout=5), sent,
                  f"nats_redis_{unique}")
    assert_linked(await wait_spans(otel_service, "postgres", n, timeout=5), sent,
                  f"nats_pg_{unique}")


async def test_headers_go_on_from_kafka_jetstream_and_redis_sources(
    tmp_path: Path, nc: NATS, nats_url: str, kafka_bootstrap: str, redis_url: str,
    unique: str, otel_service: str,
) -> None:
    n = 60
    topic, redis_key = f"trace_in_{unique}", f"it:{unique}:in"
    out_stream = f"TRACE_OUT_{unique}"
    in_stream, in_subject = f"TRACE_IN_{unique}", f"trace.in.{unique}"
    sent = contexts(n)
    await create_topic(kafka_bootstrap, topic, partitions=1)
    await create_stream(nc, in_stream, [in_subject])
    await create_stream(nc, out_stream, [f"trace.out.{unique}.>"])
    await produce(kafka_bootstrap, topic, n, headers=lambda i: header_pairs(sent[i]))
    await publish_js(nc, in_subject, n, headers=lambda i: header_pairs(sent[i]))
    r = aioredis.Redis.from_url(redis_url)
    for i in range(n):
        fields: dict[str, bytes | str] = {"data": payload(i)}
        fields.update({f"h:{k}": v for k, v in header_pairs(sent[i]).items()})
        await r.xadd(redis_key, fields)  # type: ignore[arg-type]
    core = await Collector.subscribe(nc, f"trace.core.{unique}")
    batch = {"max_messages": 25, "max_wait": "20ms"}
    file = pipeline_file(tmp_path, [
        {"name": f"kafka_js_{unique}",
         "source": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topics": [topic],
                    "group_id": f"g_{unique}", "start": "earliest"},
         "sink": {"type": "jetstream", "servers": [nats_url],
                  "subject": f"trace.out.{unique}.kafka"},
         "batch": batch},
        {"name": f"js_nats_{unique}",
         "source": {"type": "jetstream", "servers": [nats_url], "stream": in_stream,
                    "durable": f"d_{unique}"},
         "sink": {"type": "nats", "servers": [nats_url], "subject": f"trace.core.{unique}"},
         "batch": batch},
        {"name": f"redis_js_{unique}",
         "source": {"type": "redis_stream", "url": redis_url, "streams": [redis_key],
                    "group": f"g_{unique}", "header_prefix": "h:"},
         "sink": {"type": "jetstream", "servers": [nats_url],
                  "subject": f"trace.out.{unique}.redis"},
         "batch": batch},
    ])
    try:
        async with natsconn_process(file, env=otel_env(otel_service)) as proc:
            await wait_stream_count(nc, out_stream, 2 * n, timeout=20)
            await core.wait_for(n, timeout=20)
            await stop(proc)
    finally:
        await r.delete(redis_key)
        await r.aclose()

    got = {"kafka": 0, "redis": 0}
    for msg in [*await read_stream(nc, out_stream), *core.messages]:
        ctx, headers = sent[seq_of(msg.data)], msg.headers or {}
        where = msg.subject.rsplit(".", 1)[-1]
        got[where] = got.get(where, 0) + 1
        if ctx is None:
            assert "traceparent" not in headers and headers["X-Untraced"] == "yes", where
        else:
            assert headers["traceparent"] == ctx.traceparent, where
            assert headers["tracestate"] == ctx.state, where
    assert got == {"kafka": n, "redis": n, unique: n}

    for sink, name in (("jetstream", "kafka_js"), ("jetstream", "redis_js"), ("nats", "js_nats")):
        spans = [s for s in await wait_spans(otel_service, sink, n if sink == "nats" else 2 * n)
                 if s["attrs"]["natsconn.pipeline"] == f"{name}_{unique}"]
        assert_linked(spans, sent, f"{name}_{unique}")


async def test_an_unreachable_collector_costs_only_the_spans(
    tmp_path: Path, nc: NATS, nats_url: str, unique: str,
) -> None:
    """Nothing listens where the spans go: the messages move all the same, and the
    exit is not held up for long by the spans it cannot deliver (the exporter's
    timeout, OTEL_EXPORTER_OTLP_TIMEOUT, bounds it)."""
    n = 2000
    out = f"TRACE_LOST_{unique}"
    await create_stream(nc, out, [f"trace.lost.{unique}"])
    file = pipeline_file(tmp_path, [{
        "name": f"lost_{unique}",
        "source": {"type": "generate", "count": n, "subject": f"trace.lost.{unique}"},
        "sink": {"type": "jetstream", "servers": [nats_url]},
    }])
    env = {**otel_env(f"natsconn-lost-{unique}"),
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
    started = time.monotonic()
    async with natsconn_process(file, ready=False, env=env) as proc:
        await wait_stream_count(nc, out, n, timeout=20)
        moved = time.monotonic()
        # generate stops after n: natsconn exits by itself, after trying the spans
        assert await proc.wait_exit(20) == 0, proc.log()
    took = time.monotonic() - moved
    assert took < 10, f"exit {took:.1f}s after the last message ({moved - started:.1f}s " \
        f"to move {n}); log:\n{proc.log()}"
    assert "Failed to export" in proc.log()  # it did try, and said so


@pytest.mark.parametrize(("env", "error"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "unknown exporter 'zipkin'"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http/protobuf or grpc"),
])
async def test_a_tracing_setting_it_cannot_use_stops_it_at_startup(
    tmp_path: Path, env: dict[str, str], error: str,
) -> None:
    file = pipeline_file(tmp_path, [{"name": "p", "source": {"type": "generate", "count": 1},
                                     "sink": {"type": "drop"}}])
    proc = await asyncio.create_subprocess_exec(
        NATSCONN, "run", str(file), "--http-address", "off",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**_without_otel(os.environ), **env})
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2, stderr.decode()
    assert error in stderr.decode()


def _without_otel(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("OTEL_")}

