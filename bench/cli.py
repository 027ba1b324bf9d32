"""``python -m bench``: run the benchmark, list what it can measure."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from .model import parse_workers
from .registry import BROKEN, ENDPOINTS, PAIRS, Pair, load_all, parse_pair
from .runner import REPO, BenchError, Harness, Options
from .sizing import BYTE_BUDGET, DEFAULT_SIZES, QUICK_BYTE_BUDGET, parse_sizes

R = TypeVar("R")

DEFAULT_LATENCY_PAIRS = ("nats:jetstream", "jetstream:nats", "jetstream:kafka",
                         "kafka:jetstream", "nats:redis_stream", "redis_stream:nats",
                         "jetstream:jetstream", "nats:kafka")
DEFAULT_STALL_PAIRS = ("jetstream:nats", "jetstream:jetstream", "kafka:jetstream",
                       "redis_stream:nats")

EPILOG = """examples:
  python -m bench run                      # default pairs, 128 B and 1 KiB, full counts
  python -m bench run --quick              # small counts, one run: a smoke test
  python -m bench run --pairs jetstream:nats,generate:drop --sizes 128,1024,65536
  python -m bench run --pairs processing --sizes 128,256   # transforms beside no transforms
  python -m bench run --pairs jetstream:kafka --workers 1,2,4   # natsconn run --workers N
  python -m bench run --pairs nats:kafka --workers 1,2 --go-bridge-terms
  python -m bench latency --quick          # p50/p99/p99.9 at 10/50/80% of the max rate
  python -m bench stall --quick            # RSS and in-flight while the sink is stalled
  python -m bench list                     # pairs and raw legs known to the harness

Results: bench/results/<timestamp>.json and bench/results/latest.md.
"""


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure natsconn pipelines against the raw client legs, in one run.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="measure and write the table", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--quick", action="store_true",
                     help="small counts, one run, no warm-up (smoke test; figures are rough)")
    run.add_argument("--pairs", help="comma-separated SOURCE:SINK list (default: every "
                     "default pair; see `list`); `processing`: every pair with transforms "
                     "(SOURCE:SINK+VARIANT), each beside the same pipeline without them")
    run.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                     help="message sizes in bytes, e.g. 128,1024,65536 (64k and 1KiB work "
                     "too; default 128,1024)")
    run.add_argument("--count", type=int, help="messages per run for every pair and size "
                     "(default: each pair's own, e.g. 200000, 2000000 for generate->drop, "
                     f"cut to {BYTE_BUDGET // 2**20} MiB of payload per run for large "
                     f"messages: 4096 x 64 KiB; --quick: {QUICK_BYTE_BUDGET // 2**20} MiB)")
    run.add_argument("--runs", type=int, default=3, help="timed runs per measurement "
                     "(default 3; the median and range are reported)")
    run.add_argument("--no-warmup", action="store_true", help="skip the warm-up run")
    run.add_argument("--pipeline-only", action="store_true",
                     help="skip the raw legs (for comparing natsconn changes; no ratios)")
    run.add_argument("--tree", help="measure the natsconn of another checkout (a directory "
                     "with its connector/ and plugins/, e.g. `git worktree add /tmp/old "
                     "REV`) against this tree's raw legs: an A/B of natsconn versions")
    run.add_argument("--workers", help="comma-separated worker counts, e.g. 1,2,4: each "
                     "pipeline runs as `natsconn run --workers N` for every N (the raw legs "
                     "once); CPU is the parent's plus every worker's. Default: `natsconn "
                     "run` without the flag")
    run.add_argument("--go-bridge-terms", action="store_true",
                     help="live-fed pairs (nats:kafka): also report the Go-bridge comparison's "
                     "figures: msg/s from the first publish to the last arrival, messages "
                     "lost (published - distinct arrivals, read back from the sink), CPU per "
                     "message of natsconn's process tree")
    run.add_argument("--pace", type=float, default=0.0, help="live feeds (core NATS) publish "
                     "at this many msg/s, batch by batch (default 0: full speed, a batch then "
                     "a flush)")
    run.add_argument("--batch", type=int, default=1000, help="batch size (default 1000)")
    run.add_argument("--max-in-flight", type=int, default=4, help="concurrent batches "
                     "(default 4)")
    run.add_argument("--prefetch", type=int, default=10_000, help="JetStream pull window in "
                     "messages, for the source plugin and the raw pull leg alike (default "
                     "10000, the plugin's default; either way within --prefetch-bytes)")
    run.add_argument("--prefetch-bytes", type=int, default=16 * 2**20, help="JetStream pull "
                     "window in payload bytes (default 16 MiB, the plugin's default)")
    run.add_argument("--storage", choices=["file", "memory"], default="file",
                     help="JetStream stream storage (default file)")
    run.add_argument("--loop", choices=["uvloop", "asyncio"],
                     help="event loop for raw legs (default: uvloop when installed, as "
                     "natsconn run does)")
    run.add_argument("--noise", type=float, default=0.35, help="a run during which other "
                     "processes used more than this many cores is rerun (default 0.35)")
    run.add_argument("--no-start", action="store_true",
                     help="do not start the services (scripts/services start ...)")
    run.add_argument("--out", default=str(REPO / "bench" / "results"),
                     help="directory for the JSON and latest.md")
    lat = sub.add_parser(
        "latency", help="end-to-end latency under open-loop load at 10/50/80%% of the max",
        epilog="examples:\n  python -m bench latency --quick\n"
        "  python -m bench latency --pairs jetstream:kafka --sizes 1024 --seconds 20\n"
        "  python -m bench latency --pairs nats:jetstream --max-rate 50000\n\n"
        "Results: bench/results/latency-<timestamp>.json and latency-latest.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    lat.add_argument("--pairs", help="comma-separated SOURCE:SINK list (default: "
                     + ",".join(DEFAULT_LATENCY_PAIRS) + ")")
    lat.add_argument("--sizes", default="128", help="message sizes (default 128)")
    lat.add_argument("--levels", default="10,50,80", help="load levels in %% of the max rate "
                     "(default 10,50,80; the target is judged at 50)")
    lat.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level "
                     "(default 10; --quick 3)")
    lat.add_argument("--warmup", type=float, default=2.0, help="seconds of messages left out "
                     "of each level's histogram (default 2; --quick 1)")
    lat.add_argument("--max-rate", type=float, help="the pipeline's max msg/s, instead of "
                     "measuring it with a throughput run first (applies to every pair)")
    lat.add_argument("--max-from", choices=["live", "throughput"], default="live",
                     help="live (default): offer the throughput run's rate with the sender "
                     "and receiver running and take what arrives as the max (on a small "
                     "machine they compete with natsconn); throughput: the throughput run's "
                     "rate itself (a preloaded source, nothing else running)")
    lat.add_argument("--round-trips", type=int, default=200, help="sink round trips timed "
                     "with the raw client (default 200)")
    lat.add_argument("--nice", type=int, help="run natsconn's threads at this scheduling "
                     "priority during the levels (-20..19; below 0 needs root): on a machine "
                     "where natsconn shares its cores with the servers, the sender and the "
                     "receiver, shows how much of the tail is waiting for a core")
    lat.add_argument("--quick", action="store_true", help="short levels and a small "
                     "throughput run: a smoke test")
    _common(lat)
    stall = sub.add_parser(
        "stall", help="memory and back-pressure while the sink's connection is stalled",
        epilog="examples:\n  python -m bench stall --quick\n"
        "  python -m bench stall --pairs jetstream:nats,kafka:jetstream --seconds 30\n\n"
        "Results: bench/results/stall-<timestamp>.json and stall-latest.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    stall.add_argument("--pairs", help="comma-separated SOURCE:SINK list (default: "
                       + ",".join(DEFAULT_STALL_PAIRS) + ")")
    stall.add_argument("--size", type=int, default=1024, help="message size (default 1024)")
    stall.add_argument("--seconds", type=float, default=30.0, help="how long the sink stays "
                       "stalled (default 30; --quick 5)")
    stall.add_argument("--count", type=int, help="messages preloaded at the source (default: "
                       "enough for the run to outlast the stall)")
    stall.add_argument("--quick", action="store_true", help="a 5 s stall, fewer messages")
    _common(stall)
    sub.add_parser("list", help="list pairs and raw legs")
    rep = sub.add_parser("report", help="print the Markdown table of a results JSON")
    rep.add_argument("file", help="bench/results/<timestamp>.json")
    prof = sub.add_parser("profile", help="one pipeline run with py-spy attached to natsconn; "
                          "prints where its CPU goes",
                          epilog="example:\n  python -m bench profile jetstream:nats --size 128",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    prof.add_argument("pair", help="SOURCE:SINK")
    prof.add_argument("--size", type=int, default=128)
    prof.add_argument("--count", type=int, help="messages (default: the pair's count)")
    prof.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    prof.add_argument("--rate", type=int, default=200, help="py-spy samples per second "
                      "(default 200; more samples, more slowdown)")
    prof.add_argument("--no-start", action="store_true")
    prof.add_argument("--tree", help="profile another checkout's natsconn (as for run)")
    prof.add_argument("--out", help="keep the collapsed stacks here (default "
                      "bench/results/profile-<pair>-<size>.txt)")
    return top


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=1000, help="batch size (default 1000)")
    parser.add_argument("--linger", type=float, default=20.0, help="the pipeline's "
                        "batch.max_wait in ms (default 20)")
    parser.add_argument("--max-in-flight", type=int, default=4,
                        help="concurrent batches (default 4)")
    parser.add_argument("--storage", choices=["file", "memory"], default="file",
                        help="JetStream stream storage (default file)")
    parser.add_argument("--noise", type=float, default=0.35, help="wait for other processes "
                        "to use less than this many cores before each level (default 0.35)")
    parser.add_argument("--no-start", action="store_true",
                        help="do not start the services (scripts/services start ...)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"),
                        help="directory for the results")


def _service_env() -> dict[str, str]:
    """Service addresses: the environment, else what `scripts/services env` prints."""
    env: dict[str, str] = {}
    try:
        out = subprocess.run([str(REPO / "scripts" / "services"), "env"], capture_output=True,
                             text=True, timeout=30).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[7:].partition("=")
            env[key] = value.strip().strip("'\"")
    for key in list(env):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _select(text: str | None) -> list[Pair]:
    if text is None:
        return [p for p in PAIRS.values() if p.default]
    chosen = []
    for part in text.split(","):
        if part.strip() == "processing":  # every pair with transforms (bench/legs/process.py)
            chosen += [p for p in PAIRS.values() if p.variant]
            continue
        try:
            name = parse_pair(part)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        if name not in PAIRS:
            raise BenchError(f"unknown pair {name!r}; known: {', '.join(PAIRS)}"
                             + (f"; modules that failed to import: {BROKEN}" if BROKEN else ""))
        chosen.append(PAIRS[name])
    return chosen


def _list() -> int:
    print("pairs (default ones marked *):")
    for p in PAIRS.values():
        kind = "engine alone" if p.engine_only else "against raw legs"
        if p.variant and p.baseline is not None:
            kind = (f"beside {p.baseline.name} ({'engine alone, ' if p.engine_only else ''}"
                    f"{p.about})")
        print(f"  {'*' if p.default else ' '} {p.name:<24} {kind}, {p.count:,} messages")
    print("raw legs:")
    for name, ep in ENDPOINTS.items():
        for technique, desc in ep.consume_legs.items():
            print(f"    consume {name}/{technique}: {desc}")
        for technique, desc in ep.produce_legs.items():
            print(f"    produce {name}/{technique}: {desc}")
    for module, error in BROKEN.items():
        print(f"  (not loaded: {module}: {error})")
    return 0


def _start_services(pairs: list[Pair]) -> None:
    systems = sorted({ENDPOINTS[n].system for p in pairs for n in (p.source, p.sink)}
                     - {"none"})
    for system in systems:
        print(f"starting {system} (scripts/services start {system})", file=sys.stderr)
        subprocess.run([str(REPO / "scripts" / "services"), "start", system], check=True)


def _loop(choice: str | None) -> str:
    if choice is not None:
        return choice
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _tree(text: str | None) -> Path | None:
    """``--tree``: a checkout whose natsconn is measured instead of this one's."""
    if text is None:
        return None
    tree = Path(text).resolve()
    missing = [d for d in ("connector", "plugins") if not (tree / d).is_dir()]
    if missing:
        raise BenchError(f"--tree {text}: expected a natsconn checkout, found no "
                         f"{' and no '.join(d + '/' for d in missing)} in {tree}")
    return tree


def _run(args: argparse.Namespace) -> int:
    from . import report

    pairs = _select(args.pairs)
    try:
        sizes = parse_sizes(args.sizes)
        workers = parse_workers(args.workers) if args.workers else None
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if not args.no_start:
        _start_services(pairs)
    opts = Options(
        pairs=pairs, sizes=sizes, runs=1 if args.quick else args.runs,
        warmup=not (args.quick or args.no_warmup), quick=args.quick, count=args.count,
        batch=args.batch, max_in_flight=args.max_in_flight, prefetch=args.prefetch,
        prefetch_bytes=args.prefetch_bytes,
        storage=args.storage,
        loop=_loop(args.loop), noise=args.noise, env=_service_env(),
        raw_legs=not args.pipeline_only, workers=workers,
        bridge_terms=args.go_bridge_terms, pace=args.pace, tree=_tree(args.tree),
    )
    if args.quick:
        opts.max_extra = 0
    started = time.time()

    async def go() -> tuple[list, dict]:  # type: ignore[type-arg]
        async with Harness(opts) as harness:
            results = await harness.run()
            return results, harness.describe()

    results, described = asyncio.run(go())
    cond = report.conditions(opts, described, started)
    json_path, md_path = report.write(results, cond, Path(args.out))
    print(report.markdown(results, cond))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def _options(args: argparse.Namespace, pairs: list[Pair], sizes: list[int]) -> Options:
    if not args.no_start:
        _start_services(pairs)
    return Options(pairs=pairs, sizes=sizes, runs=1, warmup=False, quick=args.quick,
                   batch=args.batch, max_wait=args.linger / 1000,
                   max_in_flight=args.max_in_flight, storage=args.storage,
                   loop=_loop(None), noise=args.noise, env=_service_env())


def _latency(args: argparse.Namespace) -> int:
    from . import latency_report, report
    from .latency import LatencyOptions, LatencyRunner, select

    try:
        sizes = parse_sizes(args.sizes)
        levels = tuple(float(x) / 100 for x in args.levels.split(",") if x.strip())
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    opts = _options(args, select(args.pairs, DEFAULT_LATENCY_PAIRS), sizes)
    lat = LatencyOptions(levels=levels, seconds=3.0 if args.quick else args.seconds,
                         warmup=1.0 if args.quick else args.warmup, max_rate=args.max_rate,
                         live_max=args.max_from == "live",
                         round_trips=50 if args.quick else args.round_trips, nice=args.nice)
    started = time.time()
    results, described = _under_harness(opts, lambda h: LatencyRunner(h, lat).run())
    cond = report.conditions(opts, described, started, kind="latency")
    cond.update(load_levels=", ".join(f"{x:.0%}" for x in levels),
                seconds_per_level=f"{lat.seconds:g} s measured after {lat.warmup:g} s left out",
                round_trips=lat.round_trips,
                natsconn_nice=("default (0)" if lat.nice is None else
                               f"{lat.nice} (its threads, during the levels)"),
                max_from=("--max-rate" if lat.max_rate else
                          "what a 100% level delivered with sender and receiver running"
                          if lat.live_max else "a throughput run (preloaded source)"))
    _publish(latency_report.write(results, cond, Path(args.out)),
             latency_report.markdown(results, cond))
    return 0 if all(r.error is None for r in results) else 1


def _under_harness(opts: Options, run: Callable[[Harness], Awaitable[list[R]]]
                   ) -> tuple[list[R], dict[str, Any]]:
    """``run`` with the services started and the harness open; its results and
    the harness's description of the machine and versions."""
    async def go() -> tuple[list[R], dict[str, Any]]:
        async with Harness(opts) as harness:
            return await run(harness), harness.describe()

    return asyncio.run(go())


def _publish(paths: tuple[Path, Path], markdown: str) -> None:
    print(markdown)
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)


def _stall(args: argparse.Namespace) -> int:
    from . import report, stall_report
    from .latency import select
    from .stall import StallOptions, StallRunner

    opts = _options(args, select(args.pairs, DEFAULT_STALL_PAIRS), [args.size])
    st = StallOptions(seconds=5.0 if args.quick else args.seconds, count=args.count)
    started = time.time()
    results, described = _under_harness(opts, lambda h: StallRunner(h, st).run())
    cond = report.conditions(opts, described, started, kind="stall")
    cond.update(stall_seconds=st.seconds, sample_interval=f"{st.interval:g} s")
    _publish(stall_report.write(results, cond, Path(args.out)),
             stall_report.markdown(results, cond))
    return 0 if all(r.ok for r in results) else 1


def _profile(args: argparse.Namespace) -> int:
    from .profile import py_spy, summarise

    py_spy()
    pair = _select(args.pair)[0]
    if not args.no_start:
        _start_services([pair])
    opts = Options(pairs=[pair], sizes=[args.size], runs=1, warmup=False, count=args.count,
                   loop=_loop(None), env=_service_env(), tree=_tree(args.tree))
    out = Path(args.out) if args.out else (
        REPO / "bench" / "results" / f"profile-{pair.source}-{pair.sink}-{args.size}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)

    async def go() -> None:
        async with Harness(opts) as harness:
            harness.profile_to = out
            harness.profile_rate = args.rate
            params = harness.params(pair, args.size)
            src, dst = harness.endpoints[pair.source], harness.endpoints[pair.sink]
            if pair.engine_only:
                sample = await harness.engine_once(pair, src, dst, params)
            else:
                sample = await harness.pipeline_once(pair, src, dst, params)
            harness._line(f"{pair.name} {args.size}B", "profiled run (py-spy attached, "
                          "slower than usual)", sample)

    asyncio.run(go())
    print(summarise(out, args.top))
    print(f"collapsed stacks: {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    load_all()
    try:
        if args.command == "list":
            return _list()
        if args.command == "profile":
            return _profile(args)
        if args.command == "latency":
            return _latency(args)
        if args.command == "stall":
            return _stall(args)
        if args.command == "report":
            from . import report

            results, cond = report.load(Path(args.file))
            print(report.markdown(results, cond))
            return 0
        return _run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
