"""Runs the measurements: raw legs and pipelines, warm-up, runs, noisy reruns.

For each pair and message size, in one run of the harness:

1. every raw consume leg of the source endpoint and every raw produce leg of
   the sink endpoint, each in a worker process (bench/worker.py);
2. the pipeline, as ``natsconn run`` in a subprocess, timed at the far side:
   the window starts at the first poll that sees a message arrive and ends at
   the poll that sees the last one; natsconn's CPU comes from /proc over the
   same window.

A durable source (JetStream) is preloaded before the clock starts; a
non-durable one (core NATS) is fed at full speed by a worker running the
endpoint's feed technique once the consumer is subscribed, and what does not
arrive is reported as dropped. A source shared by a consumer group (Kafka) is
fed that way too under ``--workers N`` (N > 1): preloaded, its first worker
would drain it before the others had joined the group.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .endpoint import Endpoint
from .model import Comparison, Params, Place, Sample, Stats, bridge_terms, compare, parts_delta
from .procs import Child, CpuMeter, ServerCpu
from .profile import Recorder
from .registry import ENDPOINTS, Pair
from .sizing import BYTE_BUDGET, MIN_COUNT, QUICK_BYTE_BUDGET, QUICK_MIN_COUNT, scaled_count

REPO = Path(__file__).resolve().parent.parent
POLL = 0.01  # far-side poll interval, seconds
STALL = 10.0  # a durable-source pipeline with no progress for this long has failed
FEED_IDLE = 3.0  # a live-fed pipeline is over this long after the last arrival
SEQ_PREFIX = 12  # payload "seq": the digits of the sequence number (bench/legs/nats.py)


Feed = Coroutine[Any, Any, tuple[Sample, float]]  # a feeder run: its sample and CPU


class BenchError(Exception):
    pass


@dataclass(slots=True)
class Options:
    pairs: list[Pair]
    sizes: list[int]
    runs: int = 3
    warmup: bool = True
    quick: bool = False
    count: int | None = None  # overrides every pair's count
    batch: int = 1000
    max_wait: float = 0.02  # batch.max_wait (linger), seconds
    max_in_flight: int = 4
    prefetch: int = 10_000
    prefetch_bytes: int = 16 * 2**20
    storage: str = "file"
    loop: str = "uvloop"
    noise: float = 0.35  # a run whose foreign CPU exceeds this many cores is noisy
    max_extra: int = 3  # reruns allowed per measurement to replace noisy runs
    quiet_wait: float = 120.0  # longest wait for the machine to quieten before a run
    raw_legs: bool = True  # False: pipelines only (comparing natsconn versions)
    workers: list[int] | None = None  # each pipeline once per `natsconn run --workers N`
    bridge_terms: bool = False  # live-fed pairs: the Go-bridge comparison's figures too
    pace: float = 0.0  # live feeds' rate, msg/s (0: full speed)
    env: dict[str, str] = field(default_factory=dict)
    # The natsconn measured: another checkout's connector/ and plugins/ (an A/B of
    # natsconn versions against this harness's raw legs); None: this tree's.
    tree: Path | None = None


@dataclass(slots=True)
class Measured:
    """One measured thing (a raw leg or a pipeline) at one pair and size."""

    kind: str  # "consume", "produce", "pipeline", "engine"
    endpoint: str  # endpoint name, or the pair's name for pipelines
    technique: str
    params: Params
    stats: Stats

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "endpoint": self.endpoint, "technique": self.technique,
                "params": self.params.to_json(), **self.stats.to_json()}


@dataclass(slots=True)
class PairResult:
    pair: Pair
    size: int
    params: Params
    pipeline: Measured
    consume: list[Measured] = field(default_factory=list)
    produce: list[Measured] = field(default_factory=list)
    error: str | None = None
    baseline: Measured | None = None  # a variant: the pipeline without its transforms

    @property
    def comparison(self) -> Comparison | None:
        """A variant against its baseline, run pair by run pair."""
        if self.baseline is None:
            return None
        return compare(self.pipeline.stats.samples, self.baseline.stats.samples)

    @staticmethod
    def _best(legs: list[Measured]) -> Measured | None:
        return max(legs, key=lambda m: m.stats.rate, default=None)

    @property
    def best_consume(self) -> Measured | None:
        return self._best(self.consume)

    @property
    def best_produce(self) -> Measured | None:
        return self._best(self.produce)

    @property
    def slower_leg(self) -> Measured | None:
        legs = [m for m in (self.best_consume, self.best_produce) if m is not None]
        return min(legs, key=lambda m: m.stats.rate, default=None)

    @property
    def ratio(self) -> float | None:
        slower = self.slower_leg
        if slower is None or not slower.stats.rate:
            return None
        return self.pipeline.stats.rate / slower.stats.rate

    @property
    def cpu_ratio(self) -> float | None:
        """Pipeline CPU per message over the sum of the best raw legs' CPU per message."""
        legs = [m for m in (self.best_consume, self.best_produce) if m is not None]
        raw = sum(m.stats.cpu_per_message for m in legs)
        if not legs or not raw:
            return None
        return self.pipeline.stats.cpu_per_message / raw

    @property
    def holds(self) -> bool | None:
        if self.pair.variant:
            c = self.comparison
            if c is None:
                return None
            verdicts = []
            if self.pair.target_cost is not None:
                verdicts.append(c.cost * 1e6 <= self.pair.target_cost)
            if self.pair.target_ratio is not None:
                verdicts.append(c.ratio >= self.pair.target_ratio)
            return all(verdicts) if verdicts else None
        if self.pair.engine_only:
            target = self.pair.target_rate
            return None if target is None else self.pipeline.stats.rate >= target
        ratio = self.ratio
        if ratio is None or self.pair.target_ratio is None:
            return None
        return ratio >= self.pair.target_ratio

    def to_json(self) -> dict[str, Any]:
        return {
            "pair": self.pair.name, "size": self.size, "params": self.params.to_json(),
            "pipeline": self.pipeline.to_json(),
            "consume": [m.to_json() for m in self.consume],
            "produce": [m.to_json() for m in self.produce],
            "best_consume": self.best_consume.technique if self.best_consume else None,
            "best_produce": self.best_produce.technique if self.best_produce else None,
            "ratio": self.ratio, "cpu_ratio": self.cpu_ratio,
            "target_ratio": self.pair.target_ratio, "target_rate": self.pair.target_rate,
            "holds": self.holds, "error": self.error,
            **({"variant": self.pair.variant, "transforms": list(self.pair.transforms),
                "baseline": self.baseline.to_json() if self.baseline else None,
                "comparison": c.to_json() if (c := self.comparison) else None,
                "target_cost": self.pair.target_cost} if self.pair.variant else {}),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class Harness:
    def __init__(self, opts: Options, progress: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.endpoints: dict[str, Endpoint] = {}
        names = {n for p in opts.pairs for e in (p.source, p.sink) if e in ENDPOINTS
                 for n in ENDPOINTS[e].servers()}
        self.meter = CpuMeter(ServerCpu(sorted(names)))
        self._cache: dict[str, Measured] = {}
        self._tmp = REPO / "bench" / "results" / "tmp"
        self.profile_to: Path | None = None  # set by `bench profile`: py-spy output
        self.profile_rate = 200

    # ------------------------------------------------------------------ setup

    async def __aenter__(self) -> Harness:
        self._tmp.mkdir(parents=True, exist_ok=True)
        names = {p.source for p in self.opts.pairs} | {p.sink for p in self.opts.pairs}
        for name in sorted(names):
            if name not in ENDPOINTS:
                raise BenchError(f"no endpoint {name!r} (bench/legs/ has: "
                                 f"{', '.join(sorted(ENDPOINTS))})")
            ep = ENDPOINTS[name](self.opts.env)
            await ep.open()
            self.endpoints[name] = ep
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ep in self.endpoints.values():
            await ep.close()

    def describe(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ep in self.endpoints.values():
            out.update(ep.describe())
        return out

    # ---------------------------------------------------------------- running

    async def run(self) -> list[PairResult]:
        results = []
        for pair in self.opts.pairs:
            for size in self.opts.sizes:
                if size < pair.min_size:
                    self.say(f"{pair.name} {size}B | skipped: needs messages of at least "
                             f"{pair.min_size} B")
                    continue
                try:
                    results += await self.run_pair(pair, size)
                except BenchError as exc:  # one pair failing does not end the run
                    self.say(f"{pair.name} {size}B | failed: {exc}")
                    params = self.params(pair, size)
                    results.append(PairResult(
                        pair, size, params,
                        Measured("pipeline", pair.name, "natsconn run", params, Stats([])),
                        error=str(exc).splitlines()[0] if str(exc) else "failed"))
        return results

    def params(self, pair: Pair, size: int) -> Params:
        o = self.opts
        if o.count:
            count = o.count
        elif o.quick:
            count = scaled_count(pair.quick_count, size, QUICK_BYTE_BUDGET, QUICK_MIN_COUNT)
        else:
            count = scaled_count(pair.count, size, BYTE_BUDGET, MIN_COUNT)
        src = ENDPOINTS[pair.source]
        payload = pair.payload
        if o.bridge_terms and not src.durable and payload == "random":
            payload = "seq"  # numbered payloads: the far side's distinct arrivals count
        return Params(size=size, count=count, batch=o.batch, max_wait=o.max_wait,
                      max_in_flight=o.max_in_flight,
                      prefetch=o.prefetch, prefetch_bytes=o.prefetch_bytes,
                      ids=src.gives_ids, storage=o.storage, payload=payload,
                      pace=o.pace if not src.durable else 0.0)

    async def run_pair(self, pair: Pair, size: int) -> list[PairResult]:
        """The pair at one size: its raw legs once, then the pipeline (once per
        ``--workers`` count), one result per pipeline measured."""
        params = self.params(pair, size)
        src, dst = self.endpoints[pair.source], self.endpoints[pair.sink]
        label = f"{pair.name} {size}B"
        if pair.variant:
            return [await self.run_variant(pair, size, params)]
        if pair.engine_only:
            stats = await self.measure(f"{label} | engine", params.count,
                                       lambda p: self.engine_once(pair, src, dst, p), params)
            return [PairResult(pair, size, params,
                               Measured("engine", pair.name, "natsconn engine", params,
                                        stats))]
        consume = []
        produce = []
        for technique in src.consume_legs if self.opts.raw_legs else ():
            consume.append(await self.raw(label, src, "consume", technique,
                                          replace(params, ids=False)))
        # The sink's raw leg carries ids when the pipeline's sink would write them.
        produce_params = replace(params, ids=params.ids and dst.uses_ids, pace=0.0)
        for technique in dst.produce_legs if self.opts.raw_legs else ():
            produce.append(await self.raw(label, dst, "produce", technique, produce_params))
        results = []
        for workers in self.opts.workers or [0]:
            run_params = replace(params, workers=workers)
            what = f"natsconn run --workers {workers}" if workers else "natsconn run"
            try:
                stats = await self.measure(
                    f"{label} | pipeline {what}", params.count,
                    lambda p: self.pipeline_once(pair, src, dst, p), run_params)
            except BenchError as exc:  # one worker count failing does not end the pair
                if not workers:
                    raise
                self.say(f"{label} | {what} | failed: {exc}")
                results.append(PairResult(
                    pair, size, run_params,
                    Measured("pipeline", pair.name, what, run_params, Stats([])),
                    consume, produce, error=str(exc).splitlines()[0] or "failed"))
                continue
            results.append(PairResult(pair, size, run_params,
                                      Measured("pipeline", pair.name, what, run_params, stats),
                                      consume, produce))
        return results

    async def run_variant(self, pair: Pair, size: int, params: Params) -> PairResult:
        """A pipeline with transforms and the same without them, measured in turns
        (no raw legs: the comparison is with the baseline)."""
        base = pair.baseline
        assert base is not None
        src, dst = self.endpoints[pair.source], self.endpoints[pair.sink]
        kind, technique = (("engine", "natsconn engine") if pair.engine_only
                           else ("pipeline", "natsconn run"))

        def once(which: Pair) -> Callable[[Params], Awaitable[Sample]]:
            if which.engine_only:
                return lambda p: self.engine_once(which, src, dst, p)
            return lambda p: self.pipeline_once(which, src, dst, p)

        label = f"{pair.name} {size}B"
        without, with_ = await self.measure_beside(
            params, (f"{label} | without transforms", once(base)),
            (f"{label} | with transforms", once(pair)))
        return PairResult(pair, size, params, Measured(kind, pair.name, technique, params, with_),
                          baseline=Measured(kind, base.name, technique, params, without))

    async def measure_beside(
            self, params: Params,
            *sides: tuple[str, Callable[[Params], Awaitable[Sample]]]) -> list[Stats]:
        """Like :meth:`measure` for several things measured in turns (A, B, A, B…),
        so that a change in the machine's speed falls on each alike. A round where
        any of them was noisy is noisy; the quietest rounds are kept, each thing's
        samples in the same order (sample i of one pairs with sample i of another)."""
        o = self.opts
        if o.warmup:
            warm = replace(params, count=max(params.count // 4, min(params.count, 1000)))
            for label, once in sides:
                await self.quiet()
                self._line(label, "warm-up", await once(warm))
        rounds: list[list[Sample]] = []
        extra = 0
        while True:
            n = len(rounds) + 1
            taken = []
            for label, once in sides:
                await self.quiet()
                sample = await once(params)
                taken.append(sample)
                noisy = sample.other_cores > o.noise
                self._line(label, f"run {n}/{o.runs}" + (" (noisy)" if noisy else ""), sample)
            rounds.append(taken)
            if len(rounds) < o.runs:
                continue
            quiet = [r for r in rounds if _round_noise(r) <= o.noise]
            if len(quiet) >= o.runs or extra >= o.max_extra:
                break
            extra += 1
        kept, dropped = keep_quietest(rounds, o.runs)
        return [Stats([r[i] for r in kept], [r[i] for r in dropped])
                for i in range(len(sides))]

    async def raw(self, label: str, ep: Endpoint, kind: str, technique: str,
                  params: Params) -> Measured:
        key = json.dumps([ep.name, kind, technique, params.to_json()])
        if key in self._cache:
            self.say(f"{label} | raw {kind} {ep.name}/{technique} | measured above, reused")
            return self._cache[key]
        stats = await self.measure(
            f"{label} | raw {kind} {ep.name}/{technique}", params.count,
            lambda p: self.raw_once(ep, kind, technique, p), params)
        measured = Measured(kind, ep.name, technique, params, stats)
        self._cache[key] = measured
        return measured

    async def measure(self, label: str, count: int,
                      once: Callable[[Params], Awaitable[Sample]], params: Params) -> Stats:
        """One warm-up (a quarter of the count), ``runs`` runs, and reruns that
        replace runs disturbed by foreign CPU load."""
        o = self.opts
        if o.warmup:
            warm = replace(params, count=max(params.count // 4, min(params.count, 1000)))
            await self.quiet()
            sample = await once(warm)
            self._line(label, "warm-up", sample)
        samples: list[Sample] = []
        extra = 0
        while True:
            n = len(samples) + 1
            await self.quiet()
            sample = await once(params)
            samples.append(sample)
            noisy = sample.other_cores > o.noise
            self._line(label, f"run {n}/{o.runs}" + (" (noisy)" if noisy else ""), sample)
            if len(samples) < o.runs:
                continue
            quiet = [s for s in samples if s.other_cores <= o.noise]
            if len(quiet) >= o.runs or extra >= o.max_extra:
                break
            extra += 1
        ranked = sorted(samples, key=lambda s: s.other_cores)
        return Stats(ranked[:o.runs], ranked[o.runs:])

    async def quiet(self) -> None:
        """Wait (up to ``quiet_wait``) until other processes use less than ``noise``
        cores, sampled over half a second: other helpers' test runs come and go."""
        deadline = time.monotonic() + self.opts.quiet_wait
        said = False
        while True:
            self.meter.start()
            await asyncio.sleep(0.5)
            other = self.meter.other_cores(0.0)
            if other <= self.opts.noise:
                return
            if time.monotonic() > deadline:
                self.say(f"machine still busy ({other:.2f} other cores); measuring anyway")
                return
            if not said:
                self.say(f"waiting for the machine to quieten ({other:.2f} other cores busy)")
                said = True

    def _line(self, label: str, what: str, s: Sample) -> None:
        drop = ""
        if s.delivered is not None and s.delivered < s.messages:
            drop = f" | {s.delivered} delivered"
        notes = f" | {'; '.join(s.notes)}" if s.notes else ""
        self.say(f"{time.strftime('%H:%M:%S')} {label} | {what} | {s.rate:>11,.0f} msg/s | "
                 f"{s.cpu_per_message * 1e6:6.2f} us/msg CPU ({s.cores:.2f} cores, server "
                 f"{s.server_cores:.2f}) | "
                 f"rss {_mib(s.peak_rss)} | "
                 f"load {s.load:.2f} | other {s.other_cores:.2f} cores{drop}{notes}")

    # ------------------------------------------------------------ one run each

    def _tag(self) -> str:
        return uuid.uuid4().hex[:10]

    def _worker_argv(self, spec: dict[str, Any]) -> list[str]:
        if spec["mode"] == "engine" and self.opts.tree is not None:
            # -P: no script directory first on sys.path, so PYTHONPATH decides which
            # connector/ the engine imports (the tree's, through _tree_shim; bench/
            # stays this tree's).
            return [sys.executable, "-P", "-m", "bench.worker", json.dumps(spec)]
        return [sys.executable, "-m", "bench.worker", json.dumps(spec)]

    async def _worker(self, spec: dict[str, Any],
                      on_ready: Callable[[], Feed] | None = None,
                      profile: Path | None = None,
                      ) -> tuple[Sample, float, tuple[Sample, float] | None]:
        """Run a worker; returns its sample, its whole-life CPU and, when a live
        feed was started on READY, the feeder's sample and CPU."""
        out, cpu, fed = await self.run_worker(spec, on_ready, profile)
        return Sample.from_json(out), cpu, fed

    async def run_worker(self, spec: dict[str, Any],
                         on_ready: Callable[[], Coroutine[Any, Any, Any]] | None = None,
                         profile: Path | None = None) -> tuple[dict[str, Any], float, Any]:
        """A worker's RESULT as JSON, its whole-life CPU, and what ``on_ready`` (started
        when the worker says READY: a feed, a sender) returned."""
        spec = {"env": self.opts.env, "loop": self.opts.loop, **spec}
        child = Child(self._worker_argv(spec), env=self._child_env(spec["mode"] == "engine"),
                      cwd=str(REPO))
        recorder = (Recorder(child.pid, profile, self.profile_rate) if profile is not None
                    else None)
        result: dict[str, Any] | None = None
        feed: asyncio.Task[Any] | None = None
        failure: BaseException | None = None
        try:
            while True:
                line = await child.readline(timeout=900)
                if line is None:
                    break
                if line == "READY" and on_ready is not None:
                    feed = asyncio.create_task(on_ready())
                elif line.startswith("RESULT "):
                    result = json.loads(line[7:])
        except Exception as exc:  # a timeout, a bad line: report it with the stderr
            failure = exc
        finally:
            if result is None:
                child.kill()
            if recorder is not None:
                await asyncio.to_thread(recorder.stop)
            await child.reap()
        fed = await feed if feed is not None else None
        if result is None:
            why = f"{type(failure).__name__}: {failure}; " if failure is not None else ""
            raise BenchError(f"worker {spec.get('mode')} {spec.get('endpoint')}/"
                             f"{spec.get('technique')} failed ({why}exit {child.returncode}):"
                             f"\n{child.stderr_tail()}")
        return result, child.cpu_total, fed

    def _tree_shim(self, tree: Path) -> Path:
        """A directory holding only ``tree``'s connector/ (a symlink): first on
        PYTHONPATH it brings that natsconn, while bench/ still comes from this
        tree (a checkout's own bench/ may differ)."""
        # outside the repository: mypy and ruff would follow the symlink
        digest = hashlib.sha1(str(tree).encode()).hexdigest()[:10]
        shim = Path(tempfile.gettempdir()) / f"natsconn-bench-tree-{digest}"
        link, target = shim / "connector", tree / "connector"
        shim.mkdir(parents=True, exist_ok=True)
        if not (link.is_symlink() and link.readlink() == target):
            link.unlink(missing_ok=True)
            link.symlink_to(target, target_is_directory=True)
        return shim

    def _child_env(self, natsconn: bool = False) -> dict[str, str]:
        """The environment of a child; ``natsconn``: it runs the natsconn measured
        (``--tree``'s code first when given)."""
        env = dict(os.environ)
        env.update(self.opts.env)
        # The code of this tree, even when another checkout is installed in the venv.
        paths = [str(REPO), str(REPO / "plugins")]
        tree = self.opts.tree
        if natsconn and tree is not None:
            paths = [str(self._tree_shim(tree)), str(tree / "plugins"), *paths]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
        return env

    async def _produce(self, ep: Endpoint, place: Place, params: Params,
                       technique: str | None = None) -> tuple[Sample, float]:
        technique = technique or ep.feed_technique
        if technique is None:
            raise BenchError(f"{ep.name} has no feed technique")
        spec = {"mode": "produce", "endpoint": ep.name, "technique": technique,
                "place": place, "params": params.to_json()}
        sample, cpu, _ = await self._worker(spec)
        return sample, cpu

    async def feed(self, ep: Endpoint, place: Place, params: Params) -> Sample:
        """Fill a durable source's place with ``params.count`` messages (its feed
        technique, in a worker)."""
        sample, _ = await self._produce(ep, place, params)
        return sample

    async def raw_once(self, ep: Endpoint, kind: str, technique: str,
                       params: Params) -> Sample:
        role = "source" if kind == "consume" else "sink"
        place = await ep.create(self._tag(), params, role)
        try:
            if kind == "produce":
                self.meter.start()
                sample, cpu = await self._produce(ep, place, params, technique)
                sample.other_cores = self.meter.other_cores(cpu)
                sample.server_cores = self._server_cores(sample)
                return sample
            feed_params = replace(params, ids=False)
            if ep.durable:
                await self._produce(ep, place, feed_params)
            self.meter.start()
            on_ready = None if ep.durable else (lambda: self._produce(ep, place, feed_params))
            spec = {"mode": "consume", "endpoint": ep.name, "technique": technique,
                    "place": place, "params": params.to_json()}
            sample, cpu, fed = await self._worker(spec, on_ready)
            feed_cpu = fed[1] if fed else 0.0
            sample.other_cores = self.meter.other_cores(cpu + feed_cpu)
            sample.server_cores = self._server_cores(sample)
            if fed is not None:
                sample.notes.append(f"fed at {fed[0].rate:,.0f} msg/s")
            return sample
        finally:
            await ep.destroy(place)

    def _server_cores(self, sample: Sample) -> float:
        """Server CPU per second of a worker's window. The meter spans the worker's
        whole life, but the server is nearly idle outside the window."""
        return self.meter.server_since_start() / sample.seconds if sample.seconds else 0.0

    async def engine_once(self, pair: Pair, src: Endpoint, dst: Endpoint,
                          params: Params) -> Sample:
        config = self.pipeline_config(pair, src.source_block({}, params),
                                      dst.sink_block({}, params), params, http=None)
        self.meter.start()
        sample, cpu, _ = await self._worker({"mode": "engine", "config": config},
                                            profile=self.profile_to)
        sample.other_cores = self.meter.other_cores(cpu)
        return sample

    def pipeline_config(self, pair: Pair, source: dict[str, Any], sink: dict[str, Any],
                        params: Params, http: str | None) -> dict[str, Any]:
        transforms = {"transforms": [dict(t) for t in pair.transforms]} if pair.transforms \
            else {}
        return {
            "pipelines": [{
                "name": f"bench-{pair.source}-{pair.sink}"
                        + (f"-{pair.variant}" if pair.variant else ""),
                "source": source,
                **transforms,
                "sink": sink,
                "batch": {"max_messages": params.batch,
                          "max_wait": f"{round(params.max_wait * 1000)}ms"},
                "max_in_flight": params.max_in_flight,
            }],
            "http": {"enabled": http is not None, "address": http or "127.0.0.1:0"},
            "log": {"level": "warning"},
        }

    async def pipeline_once(self, pair: Pair, src: Endpoint, dst: Endpoint,
                            params: Params) -> Sample:
        tag = self._tag()
        src_place = await src.create(tag, params, "source")
        dst_place = await dst.create(tag, params, "sink")
        child: Child | None = None
        try:
            feed_params = replace(params, ids=False)
            preload = preloads(src, params)
            if preload:
                await self._produce(src, src_place, feed_params)
            self.meter.start()
            child, _port = await self.start_natsconn(
                pair, src.source_block(src_place, params), dst.sink_block(dst_place, params),
                params, tag)
            recorder = (Recorder(child.pid, self.profile_to, self.profile_rate)
                        if self.profile_to else None)
            feed: asyncio.Task[tuple[Sample, float]] | None = None
            cpu_before_feed = child.cpu()  # subscribed and idle: the bridge's CPU clock
            if not preload:
                feed = asyncio.create_task(self._produce(src, src_place, feed_params))
            try:
                sample = await self._watch(child, dst, dst_place, params.count, feed)
            except BenchError as exc:
                child.kill()
                await child.reap()
                raise BenchError(f"{exc}\nnatsconn run (exit {child.returncode}) stderr:\n"
                                 f"{child.stderr_tail()}") from None
            finally:
                if recorder is not None:
                    await asyncio.to_thread(recorder.stop)
            sample.peak_rss = child.hwm()
            child.terminate()
            await child.reap()
            fed = await feed if feed is not None else None
            if fed is not None:
                sample.notes.append(f"fed at {fed[0].rate:,.0f} msg/s"
                                    + (" (paced)" if params.pace > 0 else ""))
                if self.opts.bridge_terms:
                    sample.bridge = await self._bridge_terms(
                        sample, fed[0], dst, dst_place, params, cpu_before_feed)
            if fed is None or not self.opts.bridge_terms:
                sample.bridge = None
            sample.other_cores = self.meter.other_cores(
                child.cpu_total + (fed[1] if fed else 0.0))
            if child.returncode not in (0, None):
                last = child.stderr_tail(300).strip().splitlines()[-1:]
                sample.notes.append(f"natsconn exit {child.returncode}"
                                    + (f": {last[0]}" if last else ""))
            return sample
        finally:
            if child is not None and child.alive():
                child.kill()
                await child.reap()
            await src.destroy(src_place)
            await dst.destroy(dst_place)

    async def _bridge_terms(self, sample: Sample, fed: Sample, dst: Endpoint,
                            place: Place, params: Params, cpu_before: float
                            ) -> dict[str, Any] | None:
        """The Go-bridge comparison's figures: first publish (the feeder's clock) to
        the last arrival (the far side's poll), the distinct arrivals read back
        from the sink (numbered payloads), and the bridge tree's CPU meanwhile."""
        end = sample.bridge or {}
        if fed.started is None or "last_arrival" not in end:
            return None
        back = None
        if params.payload == "seq":
            try:
                back = await dst.arrivals(place, SEQ_PREFIX)
            except Exception as exc:  # the figures stand without the read-back
                sample.notes.append(f"could not read the sink back: {exc}")
        arrived = int(back["records"]) if back else int(sample.delivered or 0)
        terms = bridge_terms(fed.messages, arrived, int(back["distinct"]) if back else None,
                             fed.started, end["last_arrival"], end["cpu_last"] - cpu_before)
        terms["publisher"] = (f"paced at {params.pace:,.0f} msg/s" if params.pace > 0 else
                              "full speed (a batch, then flush)")
        terms["publisher_rate"] = fed.rate
        if back and "per_partition" in back:
            terms["per_partition"] = back["per_partition"]
        return terms

    async def start_natsconn(self, pair: Pair, source: dict[str, Any], sink: dict[str, Any],
                             params: Params, tag: str) -> tuple[Child, int]:
        """``natsconn run`` on a pipeline file for these plugin blocks, once /readyz
        answers; returns the process and its HTTP port (/metrics)."""
        port = free_port()
        config = self.pipeline_config(pair, source, sink, params, http=f"127.0.0.1:{port}")
        path = self._tmp / f"{tag}.yaml"
        path.write_text(json.dumps(config, indent=1))
        workers = ["--workers", str(params.workers)] if params.workers else []
        # cwd: first on sys.path, the workers' too (they are started with -m)
        cwd = self.opts.tree or REPO
        child = Child([sys.executable, "-m", "connector.cli", "run", str(path), *workers],
                      env=self._child_env(natsconn=True), cwd=str(cwd),
                      tree=bool(params.workers))
        try:
            await self._wait_ready(child, port)
        except BaseException:
            child.kill()
            await child.reap()
            raise
        finally:
            path.unlink(missing_ok=True)  # read at start-up
        return child, port

    async def _wait_ready(self, child: Child, port: int, timeout: float = 60.0) -> None:
        url = f"http://127.0.0.1:{port}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                await child.reap()
                raise BenchError("natsconn run exited before it was ready:\n"
                                 + child.stderr_tail())
            try:
                status = await asyncio.to_thread(_get_status, url)
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise BenchError(f"natsconn run was not ready within {timeout}s")

    async def _watch(self, child: Child, dst: Endpoint, place: Place, n: int,
                     feed: asyncio.Task[tuple[Sample, float]] | None) -> Sample:
        """Poll the far side; the window runs from the first poll that sees
        messages to the poll that sees the last one. When they all arrive between
        two polls (a small count, a sink writing in large batches), it runs from the
        poll before instead, and says so."""
        Point = tuple[float, int, float, float, dict[str, float]]
        first: Point | None = None
        last: Point | None = None
        before: Point | None = None  # the last empty poll
        seen = 0
        changed = time.perf_counter()
        notes: list[str] = []
        while True:
            count = await dst.delivered(place)
            now, cpu = time.perf_counter(), child.cpu()
            if count > seen:
                seen, changed = count, now
                last = (now, count, cpu, self.meter.server_cpu(), child.parts())
                if first is None:
                    first = last
            elif first is None:
                before = (now, count, cpu, self.meter.server_cpu(), child.parts())
            if count >= n:
                break
            if not child.alive():
                notes.append("natsconn exited early")
                break
            idle = now - changed
            if feed is None and idle > STALL:
                notes.append(f"no progress for {STALL:.0f}s")
                break
            if feed is not None and feed.done() and idle > FEED_IDLE:
                break
            if feed is not None and feed.done() and feed.exception() is not None:
                break
            await asyncio.sleep(POLL)
        if (first is not None and last is not None and last[1] == first[1]
                and before is not None):
            first = before
            notes.append("everything arrived between two polls: timed from the poll "
                         "before (a rough figure); raise the count")
        if first is None or last is None or last[1] == first[1]:
            if seen >= n:
                notes.append("all had arrived by the first poll; raise the count")
            raise BenchError(f"the far side saw too little to time ({seen} of {n}): "
                             + "; ".join(notes))
        messages = last[1] - first[1]
        if messages < n // 2 and seen >= n:
            notes.append("window shorter than half the messages; raise the count")
        seconds = last[0] - first[0]
        return Sample(messages, seconds, last[2] - first[2], 0, seen, os.getloadavg()[0],
                      server_cores=(last[3] - first[3]) / seconds, notes=notes,
                      started=first[0], parts=parts_delta(first[4], last[4]),
                      bridge={"last_arrival": last[0], "cpu_last": last[2]})


def preloads(src: Endpoint | type[Endpoint], params: Params) -> bool:
    """Whether the source is filled before natsconn starts (durable sources), or
    fed once it is ready: live sources, and group-shared ones under several
    workers, whose group forms only as the workers come up."""
    return src.durable and not (params.workers > 1 and src.group_shared)


def _round_noise(samples: list[Sample]) -> float:
    """A round of runs taken in turns is as noisy as its noisiest run."""
    return max((s.other_cores for s in samples), default=0.0)


def keep_quietest(rounds: list[list[Sample]], runs: int
                  ) -> tuple[list[list[Sample]], list[list[Sample]]]:
    """The ``runs`` quietest rounds (kept in the order they ran) and the rest."""
    ranked = sorted(range(len(rounds)), key=lambda i: _round_noise(rounds[i]))
    keep = sorted(ranked[:runs])
    return [rounds[i] for i in keep], [rounds[i] for i in sorted(ranked[runs:])]


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
