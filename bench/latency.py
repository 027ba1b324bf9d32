"""``python -m bench latency``: end-to-end latency under open-loop load.

For each pair and size, in one invocation:

1. the pipeline's **maximum rate**: one throughput run as ``bench run`` does
   (preloaded or live-fed source, timed at the far side), then (``--max-from
   live``, the default) one level offering that rate with the sender and the
   receiver running, whose delivered rate is the maximum: on a small machine
   the sender and receiver take CPU from natsconn and the servers, and 50 % of
   the throughput run's rate can already overload the pipeline. ``--max-rate``
   gives the maximum instead;
2. the **sink's round trip** with its raw client (one write and its
   acknowledgement at a time, ``--round-trips`` of them; the median counts);
3. for each **load level** (10 %, 50 %, 80 % of the maximum): a fresh place on
   each side, ``natsconn run`` between them, a raw consumer of the sink's place
   (bench/probes/) subscribed first, then an open-loop sender writing the
   level's rate into the source's place for ``--seconds``, each payload
   stamped with its intended send time (bench/schedule.py). The receiver
   records arrival minus intended send time into a log-bucket histogram
   (bench/hdr.py), leaving out the first ``--warmup`` seconds of messages.

The target of issue #8 is judged at the 50 % level: p99 <= the pipeline's
batch linger (``batch.max_wait``) + 2 x the sink's median round trip + 5 ms.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from .endpoint import Endpoint
from .hdr import Histogram
from .model import Params, Place
from .procs import renice
from .prom import buckets, fetch, quantile
from .registry import PAIRS, Pair, parse_pair
from .runner import BenchError, Harness
from .schedule import level_count
from .sizing import scaled_count
from .timed import RECEIVERS, ROUND_TRIPS, SENDERS

LEVELS = (0.1, 0.5, 0.8)
OVERLOADED = 0.95  # delivered below this share of the offered rate: the level overloads
STAGE_METRIC = "natsconn_batch_stage_seconds"
LOOP_LAG_METRIC = "natsconn_event_loop_lag_seconds"
GC_METRIC = "natsconn_gc_pause_seconds"


@dataclass(slots=True)
class Level:
    """One load level's run."""

    fraction: float  # of the maximum rate
    rate: float  # offered, msg/s
    count: int
    sent: dict[str, Any]  # the sender's result (bench/timed.py open_loop)
    received: dict[str, Any]  # the receiver's result (Arrivals.result)
    natsconn_cpu: float  # CPU seconds natsconn used during the level
    natsconn_rss: int  # its peak RSS, bytes
    notes: list[str] = field(default_factory=list)
    other_cores: float = 0.0  # CPU other processes used meanwhile (the machine is shared)
    # natsconn's own account of the level, from its /metrics at the end: per stage
    # of a written batch's oldest message (and "loop_lag"), p50/p99 in ms and count
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    # seconds natsconn's threads were runnable but waited for a core, and the
    # level's wall time: on a small machine, the scheduler's share of the tail
    natsconn_runq_wait: float = 0.0
    wall: float = 0.0

    @property
    def runq_wait_share(self) -> float:
        """Of the level's wall time, the share natsconn spent waiting for a core."""
        return self.natsconn_runq_wait / self.wall if self.wall > 0 else 0.0

    @property
    def histogram(self) -> Histogram:
        return Histogram.from_json(self.received["histogram"])

    @property
    def delivered_rate(self) -> float:
        return float(self.received.get("rate", 0.0))

    @property
    def lost(self) -> int:
        """Messages the source accepted that never reached the sink's place."""
        accepted = int(self.sent.get("sent", 0)) - int(self.sent.get("publish_errors", 0))
        return max(0, accepted - int(self.received["received"]))

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "rate": self.rate, "count": self.count,
                "sent": self.sent, "received": self.received,
                "natsconn_cpu": self.natsconn_cpu, "natsconn_rss": self.natsconn_rss,
                "notes": self.notes, "other_cores": self.other_cores,
                "stages": self.stages, "natsconn_runq_wait": self.natsconn_runq_wait,
                "wall": self.wall, "summary_ns": self.histogram.summary()}

    @classmethod
    def from_json(cls, j: dict[str, Any]) -> Level:
        return cls(j["fraction"], j["rate"], j["count"], j["sent"], j["received"],
                   j["natsconn_cpu"], j["natsconn_rss"], j.get("notes", []),
                   j.get("other_cores", 0.0), j.get("stages", {}),
                   j.get("natsconn_runq_wait", 0.0), j.get("wall", 0.0))


@dataclass(slots=True)
class PairLatency:
    pair: str
    size: int
    params: Params
    max_rate: float
    max_from: str  # "measured" (a throughput run here) or "given" (--max-rate)
    round_trips_ns: list[int]
    levels: list[Level] = field(default_factory=list)
    error: str | None = None

    @property
    def linger_ms(self) -> float:
        return self.params.max_wait * 1000

    @property
    def round_trip_ms(self) -> float | None:
        rtt = self.round_trips_ns
        return statistics.median(rtt) / 1e6 if rtt else None

    @property
    def target_ms(self) -> float | None:
        """p99 at 50 % load must not exceed this: linger + 2 x sink round trip + 5 ms."""
        rtt = self.round_trip_ms
        return None if rtt is None else self.linger_ms + 2 * rtt + 5.0

    @property
    def holds(self) -> bool | None:
        target = self.target_ms
        half = next((lv for lv in self.levels if abs(lv.fraction - 0.5) < 1e-9), None)
        if target is None or half is None:
            return None
        p99 = half.histogram.percentile(99)
        return None if p99 is None else p99 / 1e6 <= target

    def to_json(self) -> dict[str, Any]:
        return {"pair": self.pair, "size": self.size, "params": self.params.to_json(),
                "max_rate": self.max_rate, "max_from": self.max_from,
                "round_trips_ns": self.round_trips_ns, "round_trip_ms": self.round_trip_ms,
                "linger_ms": self.linger_ms, "target_ms": self.target_ms,
                "holds": self.holds, "error": self.error,
                "levels": [lv.to_json() for lv in self.levels]}

    @classmethod
    def from_json(cls, j: dict[str, Any]) -> PairLatency:
        return cls(j["pair"], j["size"], Params.from_json(j["params"]), j["max_rate"],
                   j["max_from"], j["round_trips_ns"],
                   [Level.from_json(x) for x in j["levels"]], j.get("error"))


@dataclass(slots=True)
class LatencyOptions:
    levels: tuple[float, ...] = LEVELS
    seconds: float = 10.0  # measured sending time per level
    warmup: float = 2.0  # seconds of messages left out of the histogram, per level
    max_rate: float | None = None  # skip the throughput run
    live_max: bool = True  # the max is what a 100 % level delivers (sender and receiver on)
    round_trips: int = 200
    nice: int | None = None  # natsconn's scheduling priority during the levels


def select(text: str | None, default: tuple[str, ...] = ()) -> list[Pair]:
    """Pairs named in ``text`` (``a:b,c:d``), else ``default``."""
    names = [parse_pair(p) for p in (text.split(",") if text else default)]
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        raise BenchError(f"unknown pair(s) {', '.join(unknown)}; known: {', '.join(PAIRS)}")
    return [PAIRS[n] for n in names]


class LatencyRunner:
    def __init__(self, harness: Harness, opts: LatencyOptions) -> None:
        self.h = harness
        self.opts = opts

    async def run(self) -> list[PairLatency]:
        out = []
        for pair in self.h.opts.pairs:
            for size in self.h.opts.sizes:
                out.append(await self.pair(pair, size))
        return out

    async def pair(self, pair: Pair, size: int) -> PairLatency:
        params = self.h.params(pair, size)
        src, dst = self.h.endpoints[pair.source], self.h.endpoints[pair.sink]
        label = f"{pair.name} {size}B latency"
        result = PairLatency(pair.name, size, params, 0.0, "given", [])
        missing = []
        if src.name not in SENDERS:
            missing.append(f"no timed sender for {src.name} (bench/probes/)")
        if dst.name not in RECEIVERS:
            missing.append(f"no receiver for {dst.name} (bench/probes/)")
        if missing:
            result.error = "; ".join(missing)
            self.h.say(f"{label} | skipped: {result.error}")
            return result
        try:
            if self.opts.max_rate:
                result.max_rate = self.opts.max_rate
            else:
                await self.h.quiet()
                # the full count (within the byte budget), --quick or not: a sink that
                # writes in large batches needs a few polls' worth to be timed
                full = replace(params, count=scaled_count(pair.count, size))
                sample = await self.h.pipeline_once(pair, src, dst, full)
                result.max_rate, result.max_from = sample.rate, "measured"
                self.h.say(f"{time.strftime('%H:%M:%S')} {label} | max rate "
                           f"{sample.rate:,.0f} msg/s (throughput run, {sample.messages:,} "
                           "messages)")
                if self.opts.live_max:
                    # Offer that rate with the sender and receiver running: what arrives
                    # is what the pipeline sustains beside them.
                    await self.h.quiet()
                    live = await self.level(pair, src, dst, params, 1.0, sample.rate)
                    result.max_rate, result.max_from = live.delivered_rate, "live"
                    self.h.say(f"{time.strftime('%H:%M:%S')} {label} | max rate under live "
                               f"load {live.delivered_rate:,.0f} msg/s delivered of "
                               f"{sample.rate:,.0f} offered")
            result.round_trips_ns = await self.round_trips(dst, params)
            self.h.say(f"{time.strftime('%H:%M:%S')} {label} | sink round trip median "
                       f"{result.round_trip_ms or 0:.2f} ms ({len(result.round_trips_ns)} "
                       f"with the raw client) | target p99 at 50% <= "
                       f"{result.target_ms or 0:.1f} ms")
            for fraction in self.opts.levels:
                await self.h.quiet()
                level = await self.level(pair, src, dst, params, fraction,
                                         fraction * result.max_rate)
                result.levels.append(level)
                self._line(label, level)
        except BenchError as exc:
            result.error = str(exc)
            self.h.say(f"{label} | failed: {exc}")
        return result

    async def round_trips(self, dst: Endpoint, params: Params) -> list[int]:
        if dst.name not in ROUND_TRIPS:
            return []
        place = await dst.create(uuid.uuid4().hex[:10], params, "sink")
        try:
            out, _, _ = await self.h.run_worker(
                {"mode": "round_trip", "endpoint": dst.name, "place": place,
                 "params": params.to_json(), "n": self.opts.round_trips})
            return [int(x) for x in out["round_trips_ns"]]
        finally:
            await dst.destroy(place)

    async def level(self, pair: Pair, src: Endpoint, dst: Endpoint, params: Params,
                    fraction: float, rate: float) -> Level:
        o = self.opts
        count = level_count(rate, o.warmup + o.seconds)
        skip = min(level_count(rate, o.warmup), count - 1)
        params = replace(params, count=count)
        tag = uuid.uuid4().hex[:10]
        src_place = await src.create(tag, params, "source")
        dst_place = await dst.create(tag, params, "sink")
        child = None
        try:
            child, port = await self.h.start_natsconn(
                pair, src.source_block(src_place, params), dst.sink_block(dst_place, params),
                params, tag)
            await self._consuming(src, src_place)
            if o.nice is not None:
                renice(child.pid, o.nice)
            self.h.meter.start()
            cpu0, wait0, wall0 = child.cpu(), child.runq_wait(), time.perf_counter()
            send = {"mode": "send", "endpoint": src.name, "place": src_place,
                    "params": params.to_json(), "rate": rate, "count": count}
            receive = {"mode": "receive", "endpoint": dst.name, "place": dst_place,
                       "params": params.to_json(), "count": count, "skip": skip,
                       "idle": max(5.0, 3 * params.max_wait)}
            received, receiver_cpu, sent = await self.h.run_worker(
                receive, on_ready=lambda: self.h.run_worker(send))
            natsconn_cpu = child.cpu() - cpu0
            wait, wall = child.runq_wait() - wait0, time.perf_counter() - wall0
            ours = natsconn_cpu + receiver_cpu + (sent[1] if sent else 0.0)
            level = Level(fraction, rate, count, sent[0] if sent else {}, received,
                          natsconn_cpu, child.hwm(),
                          other_cores=self.h.meter.other_cores(ours),
                          stages=await self._stages(port), natsconn_runq_wait=wait,
                          wall=wall)
            self._judge(level)
            return level
        finally:
            if child is not None:
                child.terminate()
                await child.reap()
            await src.destroy(src_place)
            await dst.destroy(dst_place)

    @staticmethod
    async def _stages(port: int) -> dict[str, dict[str, float]]:
        """natsconn's stage histograms over the whole level (warm-up included)."""
        try:
            text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/metrics")
        except OSError:
            return {}
        return stage_summary(text)

    @staticmethod
    async def _consuming(src: Endpoint, place: Place, limit: float = 60.0) -> None:
        end = time.monotonic() + limit
        while not await src.consuming(place):
            if time.monotonic() > end:
                raise BenchError(f"natsconn's {src.name} source did not start consuming "
                                 f"within {limit:.0f} s")
            await asyncio.sleep(0.1)

    @staticmethod
    def _judge(level: Level) -> None:
        r, s = level.received, level.sent
        if level.lost:
            level.notes.append(f"{level.lost:,} of {s.get('sent', 0):,} never arrived")
        if r.get("duplicates"):
            level.notes.append(f"{r['duplicates']:,} duplicates")
        if s.get("rate") and s["rate"] < OVERLOADED * level.rate:
            level.notes.append(f"sender fell behind: {s['rate']:,.0f} msg/s sent")
        if level.delivered_rate < OVERLOADED * level.rate and not level.lost:
            level.notes.append("overloaded: delivered slower than offered")
        if s.get("publish_errors"):
            level.notes.append(f"{s['publish_errors']} source write errors")
        level.notes += s.get("notes", [])

    def _line(self, label: str, lv: Level) -> None:
        h = lv.histogram
        ms = {k: (v / 1e6 if isinstance(v, int) else None) for k, v in h.summary().items()}
        fmt = {k: f"{v:.2f}" if v is not None else "-" for k, v in ms.items()}
        notes = f" | {'; '.join(lv.notes)}" if lv.notes else ""
        if lv.stages:
            notes += " | stages p99 " + stage_line(lv.stages)
        self.h.say(f"{time.strftime('%H:%M:%S')} {label} | {lv.fraction:.0%} load "
                   f"{lv.rate:,.0f} msg/s offered, {lv.delivered_rate:,.0f} delivered | "
                   f"p50 {fmt['p50']} p99 {fmt['p99']} p99.9 {fmt['p99.9']} max {fmt['max']} "
                   f"ms | natsconn {lv.natsconn_cpu / max(lv.count, 1) * 1e6:.1f} us/msg "
                   f"CPU, waited for a core {lv.runq_wait_share:.0%} of the time | other "
                   f"{lv.other_cores:.2f} cores{notes}")


def stage_summary(metrics_text: str) -> dict[str, dict[str, float]]:
    """p50/p99 (ms) and count per stage of natsconn's batch stage histograms, of its
    event-loop lag as ``loop_lag`` and of its collector's pauses as ``gc0``-``gc2``."""
    out: dict[str, dict[str, float]] = {}
    hists = buckets(metrics_text, STAGE_METRIC, "stage")
    lag = buckets(metrics_text, LOOP_LAG_METRIC, "")
    if "" in lag:
        hists["loop_lag"] = lag[""]
    for g, cumulative in buckets(metrics_text, GC_METRIC, "generation").items():
        hists[f"gc{g}"] = cumulative
    for stage, cumulative in hists.items():
        p50, p99 = quantile(cumulative, 0.5), quantile(cumulative, 0.99)
        if p50 is None or p99 is None:
            continue
        out[stage] = {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "count": cumulative[-1][1]}
    return out


STAGE_ORDER = ("batching", "queued", "writing", "settling", "total", "loop_lag", "gc1", "gc2")


def stage_line(stages: dict[str, dict[str, float]]) -> str:
    """``batching 19.8 / queued 0.4 / ...`` (p99 ms) in the stages' order."""
    parts = [f"{k} {stages[k]['p99_ms']:.1f}" for k in STAGE_ORDER if k in stages]
    return " / ".join(parts) + " ms"
