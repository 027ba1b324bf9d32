"""A bounded soak: natsconn carries a fixed rate through every plugin pair for N
minutes while its resident memory and open file descriptors are sampled; a
least-squares trend (per minute, after a warm-up) beyond the stated bounds fails.

    .venv/bin/python -m bench.soak                       # 10 minutes, every pair
    .venv/bin/python -m bench.soak --minutes 3 --rate 100 --pairs jetstream:kafka

One ``natsconn run`` process holds one pipeline per pair; a producer per pair
writes ``--rate`` messages per second at the source with the system's own
client; the sinks are counted at the far side. Uses the plain local servers
(``scripts/services start all``) under unique names, removed at the end. Prints
the samples, the trends and the verdict; ``--json`` keeps them.

With ``--fault-every SECONDS`` a fault is injected every so often, rotating
through ``--faults`` (default: a connection cut, a server restart of NATS,
Kafka, Redis and PostgreSQL in turn, a sink stalled past the sources' ack wait,
50 ± 10 ms latency for 20 s): every sink is then reached through a TCP proxy
(:class:`connector.testing.proxy.TcpProxy`) that cuts, stalls and delays. At the
end every sink is read back: a sequence number produced and never delivered is
lost, and any loss at an at-least-once pair fails the soak; duplicates are
counted. The process is never killed: RSS and fds are those of one process
under every fault (kill -9 and SIGTERM are cells of the fault matrix).

    .venv/bin/python -m bench.soak --minutes 30 --fault-every 120 --rate 500

Bounds (defaults): RSS +1.0 MiB/min, open fds +0.5/min, measured after the
warm-up (the first ``--warmup`` minutes: pools fill, caches and the allocator
settle). Every pair must also keep up: what arrived at the sink trails what was
produced by less than ``--max-lag`` seconds of traffic at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
NATSCONN = str(Path(sys.executable).with_name("natsconn"))
PAYLOAD = b'{"order": %d, "pad": "' + b"x" * 64 + b'"}'

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
KAFKA = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("POSTGRES_DSN", "postgresql://natsconn:natsconn@127.0.0.1:5432/natsconn")

FAULTS = ["cut", "restart-nats", "stall", "restart-kafka", "latency", "restart-redis", "cut",
          "restart-postgres", "stall", "latency"]
STALL_SECONDS = 12.0   # > the sources' 5 s ack wait / min idle / lease set below
LATENCY_SECONDS = 20.0
AT_MOST_ONCE = {"nats"}  # sources whose loss is allowed (docs/delivery.md)
ORDER = re.compile(rb'"order": (\d+)')

PAIRS = ["jetstream:jetstream", "jetstream:kafka", "kafka:jetstream", "jetstream:postgres",
         "postgres_outbox:jetstream", "jetstream:redis_stream", "redis_stream:jetstream",
         "redis_list:jetstream", "nats:nats"]


# ---------------------------------------------------------------------- ends


@contextlib.asynccontextmanager
async def _kafka_admin() -> AsyncIterator[Any]:
    """An aiokafka admin client for the soak's topics, closed after use."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


@dataclass
class End:
    """One side of a pair: its natsconn options, and how the soak feeds or counts it."""

    options: dict[str, Any]
    setup: Callable[[], Awaitable[None]] | None = None
    produce: Callable[[int, int], Awaitable[None]] | None = None  # (first seq, count)
    count: Callable[[], Awaitable[int]] | None = None
    cleanup: Callable[[], Awaitable[None]] | None = None
    seqs: Callable[[], Awaitable[list[int]]] | None = None  # every order number that arrived


@dataclass
class Clients:
    nc: Any = None
    kafka: Any = None
    redis: Any = None
    pg: Any = None
    core_seen: dict[str, list[int]] = field(default_factory=dict)
    # where natsconn's sinks reach each server ("host:port"), a proxy's when faults run
    via: dict[str, str] = field(default_factory=dict)

    async def open(self) -> None:
        import asyncpg
        import nats
        import redis.asyncio as aioredis
        from aiokafka import AIOKafkaProducer

        self.nc = await nats.connect(NATS_URL, pending_size=64 * 1024 * 1024)
        self.kafka = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=5)
        await self.kafka.start()
        self.redis = aioredis.Redis.from_url(REDIS_URL)
        self.pg = await asyncpg.create_pool(PG_DSN, min_size=1, max_size=3)

    async def close(self) -> None:
        for closer in (self.nc.close, self.kafka.stop, self.redis.aclose, self.pg.close):
            with contextlib.suppress(Exception):
                await closer()


def source_end(kind: str, tag: str, c: Clients) -> End:
    if kind == "jetstream":
        stream, subject = f"SOAK_IN_{tag}", f"soakin.{tag}"

        async def setup() -> None:
            await c.nc.jetstream().add_stream(name=stream, subjects=[subject])

        async def produce(first: int, n: int) -> None:
            js = c.nc.jetstream()
            acks = [js.publish(subject, PAYLOAD % i) for i in range(first, first + n)]
            await asyncio.gather(*acks)

        async def cleanup() -> None:
            await c.nc.jetstream().delete_stream(stream)

        return End({"type": "jetstream", "servers": [NATS_URL], "stream": stream,
                    "ack_wait": "5s"}, setup, produce, None, cleanup)
    if kind == "nats":
        subject = f"soakcore.{tag}"

        async def produce(first: int, n: int) -> None:
            for i in range(first, first + n):
                await c.nc.publish(subject, PAYLOAD % i)
            await c.nc.flush()

        return End({"type": "nats", "servers": [NATS_URL], "subjects": [subject]}, None,
                   produce)
    if kind == "kafka":
        topic = f"soak-in-{tag}"

        async def setup() -> None:
            from aiokafka.admin import NewTopic

            async with _kafka_admin() as admin:
                await admin.create_topics([NewTopic(topic, 3, 1)])

        async def produce(first: int, n: int) -> None:
            batch = [await c.kafka.send(topic, PAYLOAD % i) for i in range(first, first + n)]
            await asyncio.gather(*batch)

        async def cleanup() -> None:
            async with _kafka_admin() as admin:
                await admin.delete_topics([topic])

        return End({"type": "kafka", "bootstrap_servers": [KAFKA], "topics": [topic]}, setup,
                   produce, None, cleanup)
    if kind in ("redis_stream", "redis_list"):
        key = f"soak:{tag}:in"

        async def produce(first: int, n: int) -> None:
            pipe = c.redis.pipeline(transaction=False)
            for i in range(first, first + n):
                if kind == "redis_stream":
                    pipe.xadd(key, {"data": PAYLOAD % i})
                else:
                    pipe.lpush(key, PAYLOAD % i)
            await pipe.execute()

        async def cleanup() -> None:
            keys = [k async for k in c.redis.scan_iter(match=f"soak:{tag}:*")]
            if keys:
                await c.redis.delete(*keys)

        options: dict[str, Any] = {"type": kind, "url": REDIS_URL}
        options.update({"streams": [key], "min_idle_time": "5s"} if kind == "redis_stream"
                       else {"key": key, "lease": "5s"})
        return End(options, None, produce, None, cleanup)
    if kind == "postgres_outbox":
        table = f"soak_box_{tag}"

        async def setup() -> None:
            await c.pg.execute(
                f'CREATE TABLE "{table}" (id bigserial PRIMARY KEY, data bytea, subject text, '
                f'key bytea, headers jsonb, "timestamp" timestamptz DEFAULT now(), '
                f'claimed_until timestamptz)')

        async def produce(first: int, n: int) -> None:
            await c.pg.copy_records_to_table(
                table, records=[(PAYLOAD % i,) for i in range(first, first + n)],
                columns=["data"])

        async def cleanup() -> None:
            await c.pg.execute(f'DROP TABLE IF EXISTS "{table}"')

        return End({"type": "postgres_outbox", "dsn": PG_DSN, "table": table,
                    "poll_interval": "100ms", "lease": "5s"}, setup, produce, None, cleanup)
    raise SystemExit(f"unknown source {kind!r}")


def _orders(datas: list[bytes]) -> list[int]:
    return [int(m.group(1)) for d in datas if (m := ORDER.search(d))]


def _host_port(url: str) -> str:
    return url.split("://", 1)[-1].rsplit("@", 1)[-1].split("/", 1)[0]


async def _read_stream(nc: Any, stream: str, timeout: float = 300.0) -> list[bytes]:
    """Every message's data now in ``stream``: one ephemeral push consumer, no acks,
    flow control answered (so the server never takes us for a slow consumer)."""
    from nats.js import api

    expected = (await nc.jetstream().stream_info(stream)).state.messages
    got: list[bytes] = []
    done = asyncio.Event()
    if expected == 0:
        return got

    async def on_msg(msg: Any) -> None:
        if msg.headers and "Status" in msg.headers and not msg.data:
            if msg.reply:
                await nc.publish(msg.reply, b"")
            return
        got.append(msg.data)
        if len(got) >= expected:
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
    info = await nc.jetstream().add_consumer(stream, api.ConsumerConfig(
        deliver_subject=inbox, ack_policy=api.AckPolicy.NONE,
        deliver_policy=api.DeliverPolicy.ALL, inactive_threshold=30.0, flow_control=True,
        idle_heartbeat=5.0))
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_consumer(stream, info.name)
    return got


def sink_end(kind: str, tag: str, c: Clients) -> End:
    nats_url = f"nats://{c.via.get('nats', _host_port(NATS_URL))}"
    if kind == "jetstream":
        stream, subject = f"SOAK_OUT_{tag}", f"soakout.{tag}"

        async def count() -> int:
            return int((await c.nc.jetstream().stream_info(stream)).state.messages)

        async def seqs() -> list[int]:
            return _orders(await _read_stream(c.nc, stream))

        async def cleanup() -> None:
            await c.nc.jetstream().delete_stream(stream)

        return End({"type": "jetstream", "servers": [nats_url], "subject": subject,
                    "stream": stream, "stream_subjects": [subject]}, None, None, count, cleanup,
                   seqs)
    if kind == "nats":
        subject = f"soakcoreout.{tag}"
        c.core_seen[tag] = []

        async def setup() -> None:
            async def seen(msg: Any) -> None:
                c.core_seen[tag].extend(_orders([msg.data]))

            await c.nc.subscribe(subject, cb=seen, pending_msgs_limit=-1)
            await c.nc.flush()

        async def count() -> int:
            return len(c.core_seen[tag])

        async def core_seqs() -> list[int]:
            return list(c.core_seen[tag])

        return End({"type": "nats", "servers": [nats_url], "subject": subject}, setup, None,
                   count, None, core_seqs)
    if kind == "kafka":
        topic = f"soak-out-{tag}"

        async def partitions() -> list[Any]:
            from aiokafka import TopicPartition

            async with _kafka_admin() as admin:
                described = await admin.describe_topics([topic])
            return [TopicPartition(topic, p["partition"]) for d in described
                    for p in d.get("partitions") or []]

        async def count() -> int:
            from aiokafka import AIOKafkaConsumer

            parts = await partitions()
            if not parts:
                return 0
            consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
            await consumer.start()
            try:
                return int(sum((await consumer.end_offsets(parts)).values()))
            finally:
                await consumer.stop()

        async def kafka_seqs() -> list[int]:
            from aiokafka import AIOKafkaConsumer

            parts = await partitions()
            consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
            await consumer.start()
            out: list[bytes] = []
            try:
                consumer.assign(parts)
                await consumer.seek_to_beginning(*parts)
                ends = await consumer.end_offsets(parts)
                while [p for p in parts if await consumer.position(p) < ends[p]]:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        out.extend(r.value or b"" for r in records)
            finally:
                await consumer.stop()
            return _orders(out)

        async def cleanup() -> None:
            async with _kafka_admin() as admin:
                await admin.delete_topics([topic])

        options: dict[str, Any] = {"type": "kafka", "bootstrap_servers": [KAFKA],
                                   "topic": topic}
        if "kafka" in c.via:  # the broker advertises itself: map it to the proxy
            options.update(bootstrap_servers=[c.via["kafka"]],
                           broker_address_map={KAFKA: c.via["kafka"]})
        return End(options, None, None, count, cleanup, kafka_seqs)
    if kind == "redis_stream":
        key = f"soak:{tag}:out"

        async def count() -> int:
            return int(await c.redis.xlen(key))

        async def redis_seqs() -> list[int]:
            out: list[bytes] = []
            start = "-"
            while True:
                page = await c.redis.xrange(key, min=start, count=10000)
                if not page:
                    break
                out.extend(fields.get(b"data", b"") for _, fields in page)
                last = page[-1][0].decode()
                ms, seq = last.split("-")
                start = f"{ms}-{int(seq) + 1}"
            return _orders(out)

        async def cleanup() -> None:
            await c.redis.delete(key)

        redis_url = REDIS_URL.replace(_host_port(REDIS_URL), c.via.get("redis",
                                                                      _host_port(REDIS_URL)))
        return End({"type": "redis_stream", "url": redis_url, "stream": key}, None, None,
                   count, cleanup, redis_seqs)
    if kind == "postgres":
        table = f"soak_out_{tag}"

        async def count() -> int:
            try:
                return int(await c.pg.fetchval(f'SELECT count(*) FROM "{table}"'))
            except Exception:
                return 0

        async def pg_seqs() -> list[int]:
            rows = await c.pg.fetch(f'SELECT data FROM "{table}"')
            return _orders([bytes(r["data"]) for r in rows])

        async def cleanup() -> None:
            await c.pg.execute(f'DROP TABLE IF EXISTS "{table}"')

        dsn = PG_DSN.replace(_host_port(PG_DSN), c.via.get("postgres", _host_port(PG_DSN)))
        return End({"type": "postgres", "dsn": dsn, "table": table, "create_table": True},
                   None, None, count, cleanup, pg_seqs)
    raise SystemExit(f"unknown sink {kind!r}")


# ---------------------------------------------------------------------- sampling


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60.0


@dataclass
class Sample:
    t: float
    rss_mib: float
    fds: int
    produced: int
    delivered: int
    cpu_s: float = 0.0  # natsconn's CPU seconds so far


# ---------------------------------------------------------------------- the soak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVERS = {"nats": NATS_URL, "kafka": KAFKA, "redis": REDIS_URL, "postgres": PG_DSN}


async def _restart(service: str) -> str:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "services"), "restart", service,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/services restart {service} failed:\n{out.decode()}")
    return f"{service} restarted in {time.monotonic() - started:.1f}s"


async def inject(fault: str, proxies: dict[str, Any]) -> str:
    """One fault of the rotation; returns what happened."""
    if fault == "cut":
        for proxy in proxies.values():
            proxy.cut()
        return "every sink connection cut"
    if fault == "stall":
        for proxy in proxies.values():
            proxy.stall()
        await asyncio.sleep(STALL_SECONDS)
        for proxy in proxies.values():
            proxy.resume()
        return f"every sink stalled {STALL_SECONDS:g}s"
    if fault == "latency":
        for proxy in proxies.values():
            proxy.latency, proxy.jitter = 0.05, 0.01
        await asyncio.sleep(LATENCY_SECONDS)
        for proxy in proxies.values():
            proxy.latency = proxy.jitter = 0.0
        return f"50 ± 10 ms on every sink for {LATENCY_SECONDS:g}s"
    if fault.startswith("restart-"):
        return await _restart(fault.removeprefix("restart-"))
    raise SystemExit(f"unknown fault {fault!r} (expected cut, stall, latency, restart-<service>)")


async def _produce_retrying(end: End, first: int, n: int, stop: asyncio.Event) -> None:
    """``end.produce`` until it succeeds: a server being restarted refuses writes for
    a while; a retried batch may put some numbers twice (they count as duplicates)."""
    assert end.produce is not None
    while True:
        try:
            await asyncio.wait_for(end.produce(first, n), 30)
            return
        except Exception:
            if stop.is_set():
                raise
            await asyncio.sleep(0.5)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    from connector.testing.proxy import TcpProxy

    clients = Clients()
    proxies: dict[str, Any] = {}
    if args.fault_every > 0:
        for name, url in SERVERS.items():
            server_host, server_port = _host_port(url).rsplit(":", 1)
            proxies[name] = await TcpProxy(server_host, int(server_port)).start()
            clients.via[name] = proxies[name].address
    await clients.open()
    run = uuid.uuid4().hex[:6]
    pairs = [p.split(":") for p in args.pairs]
    ends = []
    for i, (src, dst) in enumerate(pairs):
        tag = f"{run}{i}"
        ends.append((f"{src}:{dst}", source_end(src, tag, clients), sink_end(dst, tag, clients)))
    workdir = Path(args.workdir)  # made by main()
    file = workdir / f"soak-{run}.yaml"
    await asyncio.to_thread(file.write_text, yaml.safe_dump({
        "pipelines": [{"name": f"soak-{i}-{name.replace(':', '-').replace('_', '-')}",
                       "source": s.options, "sink": d.options}
                      for i, (name, s, d) in enumerate(ends)],
        "log": {"level": "info"}, "shutdown_timeout": "20s"}, sort_keys=False))
    for _, s, d in ends:
        for end in (s, d):
            if end.setup is not None:
                await end.setup()
    port = free_port()
    log = (workdir / f"soak-{run}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        NATSCONN, "run", str(file), "--http-address", f"127.0.0.1:{port}", "--log-format",
        "json", stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL)
    produced = [0] * len(ends)
    samples: list[Sample] = []
    stop = asyncio.Event()

    async def producer(i: int, end: End) -> None:
        assert end.produce is not None
        tick = 0.2
        per_tick = max(1, round(args.rate * tick))
        next_at = time.monotonic()
        while not stop.is_set():
            await _produce_retrying(end, produced[i], per_tick, stop)
            produced[i] += per_tick
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def delivered() -> list[int]:
        out = []
        for _, _, d in ends:
            assert d.count is not None
            try:
                out.append(await d.count())
            except Exception:
                out.append(-1)
        return out

    faults: list[dict[str, Any]] = []

    async def faulter() -> None:
        rotation = args.faults
        k = 0
        while not stop.is_set():
            await asyncio.sleep(args.fault_every)
            if stop.is_set() or time.monotonic() > deadline - args.fault_every / 2:
                return
            fault = rotation[k % len(rotation)]
            k += 1
            at = time.monotonic() - started
            print(f"{at:7.0f}s  fault: {fault}", flush=True)
            try:
                what = await inject(fault, proxies)
            except Exception as exc:  # the soak goes on; the fault is reported as failed
                what = f"failed: {type(exc).__name__}: {exc}"
            faults.append({"t": round(at), "fault": fault, "what": what})
            print(f"{time.monotonic() - started:7.0f}s  fault done: {what}", flush=True)

    started = time.monotonic()
    deadline = started + args.minutes * 60
    await asyncio.sleep(3)  # natsconn starts (core NATS sources must be listening first)
    producers = [asyncio.create_task(producer(i, s)) for i, (_, s, _) in enumerate(ends)]
    if args.fault_every > 0:
        producers.append(asyncio.create_task(faulter()))
    try:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise SystemExit(f"natsconn exited with {proc.returncode}; see {log.name}")
            got = await delivered()
            sample = Sample(time.monotonic() - started, rss_mib(proc.pid), open_fds(proc.pid),
                            sum(produced), sum(max(0, g) for g in got), cpu_seconds(proc.pid))
            samples.append(sample)
            print(f"{sample.t:7.0f}s  rss {sample.rss_mib:7.1f} MiB  fds {sample.fds:4d}  "
                  f"produced {sample.produced:9d}  delivered {sample.delivered:9d}", flush=True)
            await asyncio.sleep(args.interval)
    finally:
        stop.set()
        await asyncio.gather(*producers, return_exceptions=True)
    # let the pipelines catch up, then the final counts and what arrived
    await asyncio.sleep(args.max_lag)
    final = await delivered()
    arrived: list[list[int] | None] = []
    for _, _, d in ends:
        try:
            arrived.append(await d.seqs() if d.seqs is not None else None)
        except Exception as exc:
            print(f"reading a sink back failed: {exc}", file=sys.stderr)
            arrived.append(None)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 40)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    log.close()
    for _, s, d in ends:
        for end in (s, d):
            if end.cleanup is not None:
                with contextlib.suppress(Exception):
                    await end.cleanup()
    await clients.close()
    for proxy in proxies.values():
        await proxy.close()

    steady = [s for s in samples if s.t >= args.warmup * 60]
    rss_slope = slope_per_minute([(s.t, s.rss_mib) for s in steady])
    fd_slope = slope_per_minute([(s.t, float(s.fds)) for s in steady])
    per_pair: dict[str, dict[str, Any]] = {}
    for i, (name, _, _) in enumerate(ends):
        seen = arrived[i]
        distinct = set(seen) if seen is not None else set()
        per_pair[name] = {
            "produced": produced[i], "delivered": final[i],
            "lost": None if seen is None else len(set(range(produced[i])) - distinct),
            "duplicated": None if seen is None else len(seen) - len(distinct)}
    behind = {name: v for name, v in per_pair.items()
              if v["delivered"] < v["produced"] and name != "nats:nats"}
    lost = {name: v["lost"] for name, v in per_pair.items()
            if name.split(":")[0] not in AT_MOST_ONCE and v["lost"] != 0}
    core = per_pair.get("nats:nats")
    failures = []
    if rss_slope > args.max_rss_slope:
        failures.append(f"RSS grows {rss_slope:.2f} MiB/min > {args.max_rss_slope}")
    if fd_slope > args.max_fd_slope:
        failures.append(f"open fds grow {fd_slope:.2f}/min > {args.max_fd_slope}")
    if lost:
        failures.append(f"lost (or not read back: None) at at-least-once pairs: {lost}")
    if behind:
        failures.append(f"pairs behind {args.max_lag:g}s after the producers stopped: {behind}")
    if core is not None and core["delivered"] < core["produced"]:
        # core NATS is at most once; count what did not arrive, do not fail on it
        print(f"core NATS: {core['produced'] - core['delivered']} of {core['produced']} "
              "not delivered (at most once)")
    result = {
        "minutes": args.minutes, "rate_per_pair": args.rate, "pairs": args.pairs,
        "warmup_minutes": args.warmup, "interval_s": args.interval,
        "rss_mib": {"first": samples[0].rss_mib if samples else None,
                    "after_warmup": steady[0].rss_mib if steady else None,
                    "last": samples[-1].rss_mib if samples else None,
                    "max": max((s.rss_mib for s in samples), default=None),
                    "slope_per_min": rss_slope, "bound": args.max_rss_slope},
        "fds": {"first": samples[0].fds if samples else None,
                "last": samples[-1].fds if samples else None,
                "max": max((s.fds for s in samples), default=None),
                "slope_per_min": fd_slope, "bound": args.max_fd_slope},
        "per_pair": per_pair, "failures": failures, "faults": faults,
        "fault_every_s": args.fault_every,
        "samples": [s.__dict__ for s in samples],
        "load_average": os.getloadavg(),
        "natsconn_cpu_share": (samples[-1].cpu_s / samples[-1].t
                               if samples and samples[-1].t else None),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=200, help="messages/s per pair")
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help="source:sink,... (default: " + ",".join(PAIRS) + ")")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="minutes left out of the trend")
    parser.add_argument("--max-rss-slope", type=float, default=1.0, help="MiB per minute")
    parser.add_argument("--max-fd-slope", type=float, default=0.5, help="fds per minute")
    parser.add_argument("--max-lag", type=float, default=15.0,
                        help="seconds the pipelines get to catch up at the end")
    parser.add_argument("--fault-every", type=float, default=0.0,
                        help="seconds between faults (default 0: none)")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help="the rotation (default: " + ",".join(FAULTS) + ")")
    parser.add_argument("--json", help="write samples and verdict here")
    parser.add_argument("--workdir", default="/tmp/natsconn-soak")
    args = parser.parse_args(argv)
    args.pairs = args.pairs.split(",")
    args.faults = args.faults.split(",")
    if args.warmup >= args.minutes:
        parser.error("--warmup must be shorter than --minutes")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = asyncio.run(soak(args))
    rss, fds = result["rss_mib"], result["fds"]
    print(f"\nRSS {rss['first']:.1f} -> {rss['last']:.1f} MiB (max {rss['max']:.1f}); trend after "
          f"{args.warmup:g} min warm-up {rss['slope_per_min']:+.3f} MiB/min (bound "
          f"{args.max_rss_slope})")
    print(f"open fds {fds['first']} -> {fds['last']} (max {fds['max']}); trend "
          f"{fds['slope_per_min']:+.3f}/min (bound {args.max_fd_slope})")
    if result["natsconn_cpu_share"] is not None:
        print(f"natsconn used {result['natsconn_cpu_share']:.0%} of one core on average")
    for name, v in result["per_pair"].items():
        print(f"  {name:<28} produced {v['produced']:8d} delivered {v['delivered']:8d} "
              f"lost {v['lost']} duplicated {v['duplicated']}")
    for f in result["faults"]:
        print(f"  fault at {f['t']:5d}s {f['fault']:<18} {f['what']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["failures"]:
        print("FAIL: " + "; ".join(result["failures"]), file=sys.stderr)
        return 1
    print("ok: no growth trend beyond the bounds; every pair kept up"
          + ("; nothing lost" if args.fault_every > 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
