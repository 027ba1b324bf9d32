"""A sink stalled for longer than the source's ack deadline: nothing lost, and no
duplicate written into NATS or JetStream.

A stalled sink (``TcpProxy.stall()``: connections open, no byte forwarded) stops
the engine's writes while the source still holds what it read: messages
prefetched into the JetStream source's buffer, batches handed to the engine and
queued in a lane or being written. If any of them outlives the source's ack
deadline (JetStream ``ack_wait``, Redis stream ``min_idle_time``, outbox
``lease``) the server hands it out again and, at a sink that does not
deduplicate, it is written twice. Here the deadline is 3 s, the stall 10 s, and
the pipeline keeps the default ``in_progress_interval`` (5 s), longer than the
deadline: the sources must keep their own messages alive on a timer derived from
their own deadline.

Each cell puts N messages (``{"seq": i}``) at the source, runs ``natsconn run``
as a child process with the sink behind the proxy, stalls the proxy once a
fifth has arrived, resumes, waits until the sink has every sequence number and
has been quiet for longer than the deadline, stops natsconn with SIGTERM and
reads the sink back. Every cell must show 0 lost and 0 duplicates: the core
NATS and JetStream sinks (``dedupe: false``, so that the stream counts every
copy) and the Redis list and stream sinks (``socket_timeout`` 2 s, so their
writes time out during the stall and are retried). Each prints a
``STALL-CELL`` line with its figures (``-s``), for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from connector.testing.proxy import TcpProxy
from connector.testing.servers import host_port

from .helpers import (
    Collector,
    NatsconnProcess,
    connect,
    consumer_info,
    payload,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    stream_count,
)

pytestmark = pytest.mark.integration

N = 3000
DEADLINE = 3.0  # ack_wait / min_idle_time / lease of the source
STALL = 10.0  # more than three deadlines
PACE = 0.004  # proxy delay per forwarded chunk: the flow is still going when it stalls
FLOW: dict[str, Any] = {
    "batch": {"max_messages": 50, "max_wait": "10ms"}, "max_in_flight": 2,
    "retry": {"initial_backoff": "100ms", "max_backoff": "1s"},
    # in_progress_interval left at its default, 5 s: longer than the deadline
}
OUTBOX_DDL = ('CREATE TABLE "{table}" (id bigserial PRIMARY KEY, data bytea, subject text, '
              'key bytea, headers jsonb, "timestamp" timestamptz DEFAULT now(), '
              'claimed_until timestamptz)')


@dataclass
class Result:
    cell: str
    sent: int
    seqs: list[int]
    seconds: float
    note: str = ""

    @property
    def lost(self) -> int:
        return self.sent - len(set(self.seqs) & set(range(self.sent)))

    @property
    def duplicated(self) -> int:
        return len(self.seqs) - len(set(self.seqs))

    def line(self) -> str:
        return (f"STALL-CELL {self.cell}: sent {self.sent} delivered {len(set(self.seqs))} "
                f"lost {self.lost} duplicated {self.duplicated} in {self.seconds:.1f}s"
                f"{'; ' + self.note if self.note else ''}")


# ---------------------------------------------------------------------- sinks


class Sink:
    """Where natsconn writes (through the proxy) and how the test reads it back."""

    def __init__(self, kind: str, unique: str, nats_url: str, redis_url: str) -> None:
        self.kind = kind
        self.unique = unique
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.collector: Collector | None = None
        self._nc: NATS | None = None
        self._r: aioredis.Redis | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self.kind in ("nats", "jetstream"):
            return host_port("nats", self.nats_url)
        return host_port("redis", self.redis_url)

    async def open(self) -> None:
        if self.kind in ("nats", "jetstream"):
            self._nc = await connect(self.nats_url)
            if self.kind == "nats":
                self.collector = await Collector.subscribe(self._nc, f"sout.{self.unique}")
            else:
                await self._nc.jetstream().add_stream(name=f"SOUT_{self.unique}",
                                                       subjects=[f"sout.{self.unique}"])
        else:
            self._r = aioredis.from_url(self.redis_url)

    def options(self, proxy: TcpProxy) -> dict[str, Any]:
        via = f"nats://{proxy.address}"
        if self.kind == "nats":
            return {"type": "nats", "servers": [via], "subject": f"sout.{self.unique}"}
        if self.kind == "jetstream":
            return {"type": "jetstream", "servers": [via], "subject": f"sout.{self.unique}",
                    "stream": f"SOUT_{self.unique}", "dedupe": False}
        where = {"host": proxy.host, "port": proxy.port, "socket_timeout": "2s"}
        if self.kind == "redis_list":
            return {"type": "redis_list", **where, "key": f"sout:{self.unique}:list"}
        return {"type": "redis_stream", **where, "stream": f"sout:{self.unique}:stream"}

    async def count(self) -> int:
        if self.collector is not None:
            return len(self.collector)
        if self._nc is not None:
            return await stream_count(self._nc, f"SOUT_{self.unique}")
        assert self._r is not None
        if self.kind == "redis_list":
            return int(await self._r.llen(f"sout:{self.unique}:list"))
        return int(await self._r.xlen(f"sout:{self.unique}:stream"))

    async def seqs(self) -> list[int]:
        if self.collector is not None:
            return self.collector.seqs()
        if self._nc is not None:
            return [seq_of(m.data) for m in await read_stream(self._nc, f"SOUT_{self.unique}")]
        assert self._r is not None
        if self.kind == "redis_list":
            return [seq_of(v) for v in await self._r.lrange(f"sout:{self.unique}:list", 0, -1)]
        entries: Any = await self._r.xrange(f"sout:{self.unique}:stream")
        return [seq_of(f[b"data"]) for _, f in entries]

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.jetstream().delete_stream(f"SOUT_{self.unique}")
            await self._nc.close()
        if self._r is not None:
            await self._r.delete(f"sout:{self.unique}:list", f"sout:{self.unique}:stream")
            await self._r.aclose()


# ---------------------------------------------------------------------- the cell


async def _stop(proc: NatsconnProcess) -> int:
    proc.signal(signal.SIGTERM)
    return await proc.wait_exit(60)


async def run_cell(cell: str, source: dict[str, Any], sink: Sink, tmp_path: Path,
                   during_stall: Callable[[], Awaitable[None]] | None = None,
                   note: Callable[[], Awaitable[str]] | None = None) -> Result:
    """The pipeline ``source`` → ``sink`` (through a proxy), stalled once a fifth has
    arrived, read back after a quiet spell longer than the source's deadline."""
    host, port = sink.address
    await sink.open()
    try:
        async with TcpProxy(host, port, delay=PACE) as proxy:
            file = pipeline_file(tmp_path, [{
                "name": "stall-" + cell.replace("->", "-to-"), "source": source,
                "sink": sink.options(proxy), **FLOW}])
            started = time.monotonic()
            proc = await NatsconnProcess.start(file)
            try:
                await proc.wait_ready(60)
                deadline = time.monotonic() + 40
                while await sink.count() < N // 5:
                    assert time.monotonic() < deadline, f"{await sink.count()} arrived"
                    await asyncio.sleep(0.05)
                proxy.stall()
                if during_stall is not None:
                    probe = asyncio.create_task(during_stall())
                await asyncio.sleep(STALL)
                proxy.resume()
                if during_stall is not None:
                    probe.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await probe
                # Every sequence number, then quiet for longer than the deadline (what
                # the server would hand out again comes within it).
                last, since = -1, time.monotonic()
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    count = await sink.count()
                    if count != last:
                        last, since = count, time.monotonic()
                    if count >= N and time.monotonic() - since > DEADLINE + 1.5:
                        break
                    await asyncio.sleep(0.2)
                code = await _stop(proc)
                assert code == 0, f"natsconn exited {code}; log:\n{proc.log()[-3000:]}"
            finally:
                await proc.kill()
            took = time.monotonic() - started
        extra = await note() if note is not None else ""
        result = Result(cell, N, await sink.seqs(), took, extra)
    finally:
        await sink.close()
    print(result.line())
    return result


# ---------------------------------------------------------------------- sources


@contextlib.asynccontextmanager
async def jetstream_source(nats_url: str, unique: str) -> AsyncIterator[
        tuple[dict[str, Any], Callable[[], Awaitable[str]]]]:
    nc = await connect(nats_url)
    stream, durable = f"SIN_{unique}", f"stall-{unique}"
    await nc.jetstream().add_stream(name=stream, subjects=[f"sin.{unique}"])
    await publish_js(nc, f"sin.{unique}", N)

    async def redeliveries() -> str:
        info = await consumer_info(nc, stream, durable)
        # consumer_seq counts every delivery, stream_seq the last message delivered
        again = int(info.delivered.consumer_seq or 0) - int(info.delivered.stream_seq or 0)
        return f"{again} redeliveries by the server"

    try:
        yield ({"type": "jetstream", "servers": [nats_url], "stream": stream,
                "durable": durable, "ack_wait": f"{DEADLINE:g}s"}, redeliveries)
    finally:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
        await nc.close()


JETSTREAM_SINKS = ["nats", "jetstream", "redis_list", "redis_stream"]


@pytest.mark.parametrize("sink_kind", JETSTREAM_SINKS)
async def test_jetstream_source_stalled_sink(sink_kind: str, nats_url: str, redis_url: str,
                                             unique: str, tmp_path: Path) -> None:
    """JetStream (ack_wait 3 s, prefetch at its default) → a sink stalled 10 s."""
    sink = Sink(sink_kind, unique, nats_url, redis_url)
    async with jetstream_source(nats_url, unique) as (source, redeliveries):
        result = await run_cell(f"jetstream->{sink_kind}", source, sink, tmp_path,
                                note=redeliveries)
    assert result.lost == 0, result.line()
    assert result.note.startswith("0 redeliveries"), result.line()
    # NATS and JetStream: the guarantee. The Redis sinks too, since a round trip
    # that timed out is held rather than sent again (natsconn_redis/writer.py).
    assert result.duplicated == 0, result.line()


async def test_redis_stream_source_stalled_sink(nats_url: str, redis_url: str, unique: str,
                                                tmp_path: Path) -> None:
    """Redis stream (min_idle_time 3 s) → core NATS stalled 10 s: no entry of the
    batches being written becomes claimable by another consumer (polled with
    XPENDING ... IDLE during the stall, as a second replica's scan would see it),
    none is read again, nothing is written twice."""
    r = aioredis.from_url(redis_url)
    stream, group = f"sin:{unique}", f"g-{unique}"
    pipe = r.pipeline(transaction=False)
    for i in range(N):
        pipe.xadd(stream, {"data": payload(i)})
    await pipe.execute()
    claimable = 0

    async def probe() -> None:
        nonlocal claimable
        while True:
            rows = await r.xpending_range(stream, group, "-", "+", N,
                                          idle=int(DEADLINE * 1000))
            claimable = max(claimable, len(rows))
            await asyncio.sleep(0.25)

    async def note() -> str:
        return f"at most {claimable} entries claimable by another consumer during the stall"

    try:
        result = await run_cell(
            "redis_stream->nats",
            {"type": "redis_stream", "url": redis_url, "streams": [stream], "group": group,
             "consumer": "c1", "min_idle_time": f"{DEADLINE:g}s", "claim_interval": "500ms"},
            Sink("nats", unique, nats_url, redis_url), tmp_path, probe, note)
    finally:
        await r.delete(stream)
        await r.aclose()
    assert result.lost == 0, result.line()
    assert result.duplicated == 0, result.line()
    assert claimable == 0, result.line()


async def test_outbox_source_stalled_sink(nats_url: str, redis_url: str, postgres_dsn: str,
                                          unique: str, tmp_path: Path) -> None:
    """PostgreSQL outbox (lease 3 s) → JetStream (``dedupe: false``) stalled 10 s:
    the leases of the rows being written are renewed, none is claimed again."""
    table = f"sin_{unique}".replace("-", "_")
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute(OUTBOX_DDL.format(table=table))
    await conn.copy_records_to_table(table, records=[(payload(i),) for i in range(N)],
                                     columns=["data"])
    expired = 0

    async def probe() -> None:
        nonlocal expired
        while True:
            n = await conn.fetchval(f'SELECT count(*) FROM "{table}" WHERE claimed_until '
                                    "IS NOT NULL AND claimed_until < now()")
            expired = max(expired, int(n))
            await asyncio.sleep(0.25)

    async def note() -> str:
        return f"at most {expired} rows with an expired lease during the stall"

    try:
        result = await run_cell(
            "outbox->jetstream",
            {"type": "postgres_outbox", "dsn": postgres_dsn, "table": table,
             "lease": f"{DEADLINE:g}s", "poll_interval": "200ms"},
            Sink("jetstream", unique, nats_url, redis_url), tmp_path, probe, note)
    finally:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        await conn.close()
    assert result.lost == 0, result.line()
    assert result.duplicated == 0, result.line()
    assert expired == 0, result.line()
