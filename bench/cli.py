"""``python -m bench``: run the benchmark, list what it can measure."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from .registry import BROKEN, ENDPOINTS, PAIRS, Pair, load_all, parse_pair
from .runner import REPO, BenchError, Harness, Options

EPILOG = """examples:
  python -m bench run                      # default pairs, 128 B and 1 KiB, full counts
  python -m bench run --quick              # small counts, one run: a smoke test
  python -m bench run --pairs jetstream:nats,generate:drop --sizes 128
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
                     "default pair; see `list`)")
    run.add_argument("--sizes", default="128,1024", help="message sizes in bytes "
                     "(default 128,1024)")
    run.add_argument("--count", type=int, help="messages per run for every pair (default: "
                     "each pair's own, e.g. 200000; 2000000 for generate->drop)")
    run.add_argument("--runs", type=int, default=3, help="timed runs per measurement "
                     "(default 3; the median and range are reported)")
    run.add_argument("--no-warmup", action="store_true", help="skip the warm-up run")
    run.add_argument("--pipeline-only", action="store_true",
                     help="skip the raw legs (for comparing natsconn changes; no ratios)")
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
    prof.add_argument("--out", help="keep the collapsed stacks here (default "
                      "bench/results/profile-<pair>-<size>.txt)")
    return top


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


def _run(args: argparse.Namespace) -> int:
    from . import report

    pairs = _select(args.pairs)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not args.no_start:
        _start_services(pairs)
    opts = Options(
        pairs=pairs, sizes=sizes, runs=1 if args.quick else args.runs,
        warmup=not (args.quick or args.no_warmup), quick=args.quick, count=args.count,
        batch=args.batch, max_in_flight=args.max_in_flight, prefetch=args.prefetch,
        prefetch_bytes=args.prefetch_bytes,
        storage=args.storage,
        loop=_loop(args.loop), noise=args.noise, env=_service_env(),
        raw_legs=not args.pipeline_only,
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


def _profile(args: argparse.Namespace) -> int:
    from .profile import py_spy, summarise

    py_spy()
    pair = _select(args.pair)[0]
    if not args.no_start:
        _start_services([pair])
    opts = Options(pairs=[pair], sizes=[args.size], runs=1, warmup=False, count=args.count,
                   loop=_loop(None), env=_service_env())
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
