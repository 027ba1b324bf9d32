"""``python -m bench stall``: memory and back-pressure while the sink is stalled.

For each pair: the source is preloaded; ``natsconn run`` starts with its
sink connected through a :class:`connector.testing.proxy.TcpProxy`; once a
quarter of the messages has arrived at full speed, the proxy stops forwarding
(``stall()``: connections stay open, no byte moves) for ``--seconds``, then
forwards again (``resume()``) until the far side has every message. Every 0.5 s
the harness samples natsconn's RSS
(``/proc/<pid>/status``), its ``natsconn_in_flight_*`` gauges and message
counters (``/metrics``), the source's backlog (JetStream consumer
``num_pending`` / ``num_ack_pending``, Kafka group lag, Redis group lag) and
the far side's count.

It reports RSS before / peak while stalled / after, the in-flight maximum
against the engine's bound (``batch.max_messages x (max_in_flight + 1)``
messages, ``max_in_flight_bytes``), whether the source was held back (its
backlog stayed at the source instead of in natsconn), and whether everything
arrived after the resume.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from connector.testing.proxy import TcpProxy

from .endpoint import Endpoint
from .model import Params, Place
from .procs import Child
from .prom import scrape
from .registry import Pair
from .runner import BenchError, Harness

LEAD = 5.0  # at most this long of full flow before the stall
DRAIN_LIMIT = 180.0  # longest wait for every message after the resume
MAX_IN_FLIGHT_BYTES = 64 * 2**20  # the pipeline's default max_in_flight_bytes


@dataclass(slots=True)
class StallOptions:
    seconds: float = 30.0
    count: int | None = None  # preloaded messages; default by size
    interval: float = 0.5


@dataclass(slots=True)
class StallResult:
    pair: str
    size: int
    count: int
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    bound_messages: int = 0
    drain_seconds: float | None = None

    def _phase(self, phase: str) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["phase"] == phase]

    def _max(self, key: str, phase: str | None = None) -> float:
        rows = self.samples if phase is None else self._phase(phase)
        return max((float(s.get(key) or 0) for s in rows), default=0.0)

    @property
    def rss_before(self) -> int:
        rows = self._phase("flowing")
        return int(rows[-1]["rss"]) if rows else 0

    @property
    def rss_peak(self) -> int:
        return int(self._max("rss", "stalled"))

    @property
    def rss_after(self) -> int:
        return int(self.samples[-1]["rss"]) if self.samples else 0

    @property
    def in_flight_max(self) -> int:
        return int(self._max("in_flight"))

    @property
    def in_flight_bytes_max(self) -> int:
        return int(self._max("in_flight_bytes"))

    @property
    def delivered(self) -> int:
        return int(self.samples[-1]["delivered"]) if self.samples else 0

    @property
    def read_while_stalled(self) -> int | None:
        """Messages natsconn took from its source during the stall (natsconn_messages_in):
        what filled its window, then nothing."""
        rows = [s for s in self._phase("stalled") if s.get("messages_in") is not None]
        before = [s for s in self._phase("flowing") if s.get("messages_in") is not None]
        if not rows:
            return None
        start = before[-1]["messages_in"] if before else rows[0]["messages_in"]
        return int(rows[-1]["messages_in"] - start)

    @property
    def reading_stopped(self) -> bool | None:
        """natsconn_messages_in did not move during the second half of the stall
        (the first half fills the window: writes already on the wire complete)."""
        rows = [s for s in self._phase("stalled") if s.get("messages_in") is not None]
        if len(rows) < 2:
            return None
        return bool(rows[len(rows) // 2]["messages_in"] == rows[-1]["messages_in"])

    @property
    def held_back(self) -> bool | None:
        """The source kept the backlog while stalled: its waiting count (JetStream
        num_pending, Kafka/Redis lag) stayed above zero all through the stall, and
        natsconn stopped reading."""
        rows = [s for s in self._phase("stalled") if s.get("backlog")]
        if not rows:
            return None
        key = "num_pending" if "num_pending" in rows[0]["backlog"] else "lag"
        return (all(int(s["backlog"].get(key, 0)) > 0 for s in rows)
                and self.reading_stopped is not False)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.delivered >= self.count
                and self.in_flight_max <= self.bound_messages)

    def to_json(self) -> dict[str, Any]:
        return {"pair": self.pair, "size": self.size, "count": self.count,
                "seconds": self.seconds, "error": self.error, "notes": self.notes,
                "bound_messages": self.bound_messages, "drain_seconds": self.drain_seconds,
                "rss_before": self.rss_before, "rss_peak": self.rss_peak,
                "rss_after": self.rss_after, "in_flight_max": self.in_flight_max,
                "in_flight_bytes_max": self.in_flight_bytes_max,
                "delivered": self.delivered, "held_back": self.held_back, "ok": self.ok,
                "read_while_stalled": self.read_while_stalled,
                "samples": self.samples}

    @classmethod
    def from_json(cls, j: dict[str, Any]) -> StallResult:
        return cls(j["pair"], j["size"], j["count"], j["seconds"], j["samples"],
                   j.get("notes", []), j.get("error"), j.get("bound_messages", 0),
                   j.get("drain_seconds"))


def default_count(size: int, quick: bool) -> int:
    """The stall begins once a quarter has arrived; the rest waits at the source.
    200,000 messages (50,000 with --quick) within 256 MiB of payload (64 MiB)."""
    budget = (64 if quick else 256) * 2**20
    return max(2_000, min(50_000 if quick else 200_000, budget // max(size, 1)))


class StallRunner:
    def __init__(self, harness: Harness, opts: StallOptions) -> None:
        self.h = harness
        self.opts = opts

    async def run(self) -> list[StallResult]:
        out = []
        for pair in self.h.opts.pairs:
            for size in self.h.opts.sizes:
                out.append(await self.pair(pair, size))
        return out

    async def pair(self, pair: Pair, size: int) -> StallResult:
        src, dst = self.h.endpoints[pair.source], self.h.endpoints[pair.sink]
        count = self.opts.count or default_count(size, self.h.opts.quick)
        params = replace(self.h.params(pair, size), count=count)
        result = StallResult(pair.name, size, count, self.opts.seconds,
                             bound_messages=params.batch * (params.max_in_flight + 1))
        label = f"{pair.name} {size}B stall"
        address = dst.server_address()
        if not src.durable or address is None:
            result.error = ("the source must be durable (preloaded)" if not src.durable else
                            f"{dst.name}'s connection cannot be put behind a proxy")
            self.h.say(f"{label} | skipped: {result.error}")
            return result
        try:
            await self._run(pair, src, dst, params, address, result, label)
        except BenchError as exc:
            result.error = str(exc)
            self.h.say(f"{label} | failed: {exc}")
        return result

    async def _run(self, pair: Pair, src: Endpoint, dst: Endpoint, params: Params,
                   address: tuple[str, int], result: StallResult, label: str) -> None:
        tag = uuid.uuid4().hex[:10]
        src_place = await src.create(tag, params, "source")
        dst_place = await dst.create(tag, params, "sink")
        proxy = await TcpProxy(*address).start()
        child: Child | None = None
        try:
            self.h.say(f"{label} | preloading {params.count:,} messages")
            await self.h.feed(src, src_place, replace(params, ids=False))
            sink = dst.via(proxy.host, proxy.port).sink_block(dst_place, params)
            child, port = await self.h.start_natsconn(
                pair, src.source_block(src_place, params), sink, params, tag)
            sampler = _Sampler(child, port, src, src_place, dst, dst_place, result,
                               self.opts.interval)
            # Full flow until a quarter has arrived (LEAD seconds at most), then stall:
            # the rest stays at the source, where it should be held back.
            await sampler.run_until("flowing", lambda s: int(s["delivered"]) >= params.count
                                    // 4, LEAD, interval=0.05)
            proxy.stall()
            self.h.say(f"{label} | sink connection stalled for {self.opts.seconds:g} s")
            await sampler.run_for("stalled", self.opts.seconds)
            proxy.resume()
            resumed = time.monotonic()
            self.h.say(f"{label} | resumed; waiting for every message")
            await sampler.run_until(
                "resumed", lambda s: int(s["delivered"]) >= params.count, DRAIN_LIMIT)
            if result.delivered >= params.count:
                result.drain_seconds = time.monotonic() - resumed
                await sampler.run_for("after", 2.0)
            else:
                result.notes.append(f"only {result.delivered:,} of {params.count:,} "
                                    f"delivered {DRAIN_LIMIT:.0f} s after the resume")
            last = result.samples[-1] if result.samples else {}
            if last.get("retries"):
                result.notes.append(f"natsconn retried {int(last['retries']):,} sink "
                                    "write(s)")
            if last.get("reconnects"):
                result.notes.append(f"{int(last['reconnects']):,} reconnect(s)")
            if result.delivered > params.count:
                result.notes.append(f"{result.delivered - params.count:,} duplicates at the "
                                    "far side (retried writes or redeliveries)")
            self.h.say(f"{label} | RSS {result.rss_before / 2**20:.0f} MiB before, "
                       f"{result.rss_peak / 2**20:.0f} MiB peak stalled, "
                       f"{result.rss_after / 2**20:.0f} MiB after | in flight max "
                       f"{result.in_flight_max:,} (bound {result.bound_messages:,}) | "
                       f"held back: {result.held_back} | delivered {result.delivered:,}")
        finally:
            if child is not None:
                child.terminate()
                await child.reap()
            await proxy.close()
            await src.destroy(src_place)
            await dst.destroy(dst_place)


class _Sampler:
    """One row every ``interval`` seconds: natsconn's RSS and gauges, the source's
    backlog, the far side's count."""

    def __init__(self, child: Child, port: int, src: Endpoint, src_place: Place,
                 dst: Endpoint, dst_place: Place, result: StallResult,
                 interval: float) -> None:
        self.child, self.url = child, f"http://127.0.0.1:{port}/metrics"
        self.src, self.src_place, self.dst, self.dst_place = src, src_place, dst, dst_place
        self.result, self.interval = result, interval
        self.t0 = time.monotonic()

    async def sample(self, phase: str) -> dict[str, Any]:
        try:
            metrics = await asyncio.to_thread(scrape, self.url)
        except OSError:
            metrics = {}
        row = {
            "t": round(time.monotonic() - self.t0, 2), "phase": phase,
            "rss": _rss(self.child.pid),
            "in_flight": metrics.get("natsconn_in_flight_messages"),
            "in_flight_bytes": metrics.get("natsconn_in_flight_bytes"),
            "messages_in": metrics.get("natsconn_messages_in_total"),
            "messages_out": metrics.get("natsconn_messages_out_total"),
            "reconnects": metrics.get("natsconn_reconnects_total"),
            "retries": metrics.get("natsconn_retries_total"),
            "backlog": await self.src.backlog(self.src_place),
            "delivered": await self.dst.delivered(self.dst_place),
        }
        self.result.samples.append(row)
        return row

    async def run_for(self, phase: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await self.sample(phase)
            await asyncio.sleep(self.interval)

    async def run_until(self, phase: str, done: Any, limit: float,
                        interval: float | None = None) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if done(await self.sample(phase)):
                return
            if not self.child.alive():
                raise BenchError("natsconn exited during the stall run:\n"
                                 + (await _reaped(self.child)))
            await asyncio.sleep(interval or self.interval)


async def _reaped(child: Child) -> str:
    await child.reap()
    return child.stderr_tail()


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
