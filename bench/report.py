"""The results as JSON (everything) and as a Markdown table (the summary)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .model import Params, Sample, Stats, ceiling
from .registry import ENDPOINTS, PAIRS
from .runner import REPO, Measured, Options, PairResult


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _git(where: Path = REPO) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "connector", "plugins",
                                "bench"], cwd=where, capture_output=True, text=True,
                               check=True).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def conditions(opts: Options, described: dict[str, str], started: float,
               kind: str = "throughput") -> dict[str, Any]:
    loop = opts.loop
    if loop == "uvloop":
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "git": _git(),
        **({"natsconn_measured": f"{opts.tree} at {_git(opts.tree)} (--tree)"}
           if opts.tree is not None else {}),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "event_loop": loop,
        "batch_max_messages": opts.batch,
        "batch_max_wait": f"{opts.max_wait * 1000:g}ms",
        "max_in_flight": opts.max_in_flight,
        "jetstream_prefetch": f"{opts.prefetch} messages within "
                              f"{opts.prefetch_bytes / 2**20:g} MiB",
        "jetstream_storage": opts.storage,
        **({"runs": opts.runs,
            "warmup": "one run at a quarter of the count" if opts.warmup else "none"}
           if kind == "throughput" else {"measurement": kind}),
        "noise_threshold_cores": opts.noise,
        **described,
    }


def _ids_label(endpoint: str) -> str:
    """How the ids a produce leg carries are written (Nats-Msg-Id, a unique column…)."""
    ep = ENDPOINTS.get(endpoint)
    return ep.ids_label if ep is not None else "with ids"


def _rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    return f"{v / 1e3:.1f}k"


def _range(m: Measured) -> str:
    s = m.stats
    return f"{_rate(s.rate)} ({_rate(s.rate_min)}-{_rate(s.rate_max)})"


def _us(v: float) -> str:
    return f"{v * 1e6:.2f}"


def _mark(holds: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[holds]


def _cost(seconds: float) -> str:
    return f"{seconds * 1e6:+.2f}"


def _name(r: PairResult) -> str:
    return r.pair.name + (f" (--workers {r.params.workers})" if r.params.workers else "")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def worker_cores(samples: list[Sample]) -> dict[str, float]:
    """Per member of natsconn's process tree (parent, w0, w1…): its CPU over the
    window in cores, the median over the runs."""
    names = sorted({k for s in samples for k in s.parts}, key=_member_order)
    return {k: _median([s.parts.get(k, 0.0) / s.seconds for s in samples if s.seconds > 0])
            for k in names}


def _member_order(name: str) -> tuple[int, int, str]:
    if name == "parent":
        return (0, 0, name)
    if name.startswith("w") and name[1:].isdigit():
        return (1, int(name[1:]), name)
    return (2, 0, name)


def scaling(results: list[PairResult]) -> list[str]:
    """`--workers N`: each pipeline's rate and CPU per message by worker count, the
    CPU of each process, and what those figures imply for dedicated cores."""
    rows = [r for r in results if r.params.workers and not r.pair.variant]
    if not rows:
        return []
    out = ["## Scaling (`natsconn run --workers N`)", "",
           "| pipeline | size | workers | msg/s (range) | ratio | CPU µs/msg (tree) | "
           "CPU use: total / parent / per worker (cores) | server cores | implied 4 cores | "
           "implied 8 cores | delivered |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error is not None:
            out.append(f"| {r.pair.name} | {r.size} B | {r.params.workers} | failed: "
                       f"{r.error} | - | - | - | - | - | - | - |")
            continue
        s = r.pipeline.stats
        cores = worker_cores(s.samples)
        workers = " + ".join(f"{cores[k]:.2f}" for k in cores if k != "parent") or "-"
        per = f"{s.cores:.2f} / {cores.get('parent', 0.0):.2f} / {workers}"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        cpu = s.cpu_per_message
        delivered = s.delivered_min
        got = "-" if delivered is None else (
            "all" if delivered >= r.params.count else f"{delivered:,} (min)")
        out.append(f"| {r.pair.name} | {r.size} B | {r.params.workers} | {_range(r.pipeline)} | "
                   f"{ratio} | {_us(cpu)} | {per} | {s.server_cores:.2f} | "
                   f"{_rate(ceiling(cpu, 4))} | {_rate(ceiling(cpu, 8))} | {got} |")
    out += ["", "CPU µs/msg: user+sys of natsconn's whole process tree (the parent and "
            "every worker, /proc/<pid>/stat of each) over the timed window, per message. "
            "CPU use: the same in cores (CPU seconds per second of the window), for the "
            "tree, the parent, and each worker. Implied K cores: K / (CPU per message): the "
            "rate K dedicated cores would sustain at this row's CPU per message if the work "
            "spread evenly over them and the servers ran elsewhere (on this machine the "
            "servers, the feeder and natsconn share the cores; the servers' CPU is in the "
            "server column).", ""]
    return out


def bridge_rows(r: PairResult) -> dict[str, Any] | None:
    """The Go-bridge comparison's figures of one result: medians over its runs."""
    terms = [s.bridge for s in r.pipeline.stats.samples if s.bridge]
    if not terms:
        return None
    return {
        "rate": _median([t["rate"] for t in terms]),
        "rate_min": min(t["rate"] for t in terms),
        "rate_max": max(t["rate"] for t in terms),
        "cpu_per_message": _median([t["cpu_per_message"] for t in terms]),
        "published": min(t["published"] for t in terms),
        "lost": max(t["lost"] for t in terms),
        "duplicates": max(t["duplicates"] for t in terms),
        "checked": all(t["distinct_checked"] for t in terms),
        "publisher": terms[0]["publisher"],
        "publisher_rate": _median([t["publisher_rate"] for t in terms]),
        "per_partition": terms[0].get("per_partition"),
        "runs": len(terms),
    }


def go_bridge(results: list[PairResult]) -> list[str]:
    """`--go-bridge-terms`: the figures the comparison with the Go nats-kafka bridge uses."""
    rows = [(r, b) for r in results if r.error is None and (b := bridge_rows(r)) is not None]
    if not rows:
        return []
    out = ["## In the Go bridge's terms", "",
           "| pipeline | size | workers | msg/s first publish → last arrival (range) | "
           "published | lost | duplicates | CPU µs/msg (tree) | publisher | records per "
           "partition (run 1) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r, b in rows:
        parts = ", ".join(f"{n:,}" for n in b["per_partition"]) if b["per_partition"] else "-"
        lost = f"{b['lost']:,}" + ("" if b["checked"] else " (records counted, not read back)")
        out.append(f"| {r.pair.name} | {r.size} B | {r.params.workers or '-'} | "
                   f"{_rate(b['rate'])} ({_rate(b['rate_min'])}-{_rate(b['rate_max'])}) | "
                   f"{b['published']:,} (min) | {lost} (max) | {b['duplicates']:,} (max) | "
                   f"{_us(b['cpu_per_message'])} | {b['publisher']}, "
                   f"{_rate(b['publisher_rate'])} msg/s | {parts} |")
    out += ["", "msg/s: distinct messages that arrived, over the time from the publisher's "
            "first publish (its clock, CLOCK_MONOTONIC) to the poll that saw the last one "
            "arrive; lost: published minus distinct arrivals, read back from the topic "
            "after the run by their sequence numbers; CPU: natsconn's process tree (parent "
            "and workers) from just before the first publish to the last arrival, per "
            "distinct message. Medians of the runs (lost and duplicates: the worst run).", ""]
    return out


def processing(results: list[PairResult]) -> list[str]:
    """The variants' table: each pipeline with transforms beside itself without."""
    rows = [r for r in results if r.pair.variant]
    if not rows:
        return []
    out = ["## Processing", "",
           "| pipeline | transforms | size | count | msg/s with (range) | msg/s without "
           "(range) | ratio (range) | cost µs/msg (range) | CPU µs/msg with / without (Δ) | "
           "target | peak RSS | delivered |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.pair.name + (" (engine)" if r.pair.engine_only else "")
        if r.error is not None:
            out.append(f"| {name} | {r.pair.about} | {r.size} B | {r.params.count:,} | "
                       f"failed: {r.error} | - | - | - | - | - | - | - |")
            continue
        p, b, c = r.pipeline, r.baseline, r.comparison
        targets = []
        if r.pair.target_cost is not None:
            targets.append(f"<= {r.pair.target_cost:g} µs")
        if r.pair.target_ratio is not None:
            targets.append(f">= {r.pair.target_ratio:g}x")
        target = f"{' and '.join(targets)}: {_mark(r.holds)}" if targets else "-"
        without = _range(b) if b is not None else "-"
        if c is None or b is None:
            ratio = cost = cpu = "-"
        else:
            ratio = f"{c.ratio:.2f} ({c.ratio_min:.2f}-{c.ratio_max:.2f})"
            cost = f"{_cost(c.cost)} ({_cost(c.cost_min)} to {_cost(c.cost_max)})"
            cpu = (f"{_us(p.stats.cpu_per_message)} / {_us(b.stats.cpu_per_message)} "
                   f"({_cost(c.cpu_cost)})")
        delivered = p.stats.delivered_min
        got = "-" if delivered is None else (
            "all" if delivered >= r.params.count else f"{delivered:,} (min)")
        out.append(f"| {name} | {r.pair.about} | {r.size} B | {r.params.count:,} | "
                   f"{_range(p)} | {without} | {ratio} | {cost} | {cpu} | {target} | "
                   f"{p.stats.peak_rss / 2**20:.0f} MiB | {got} |")
    out += ["", "Each pipeline with its transforms and the same pipeline without them "
            "(same payloads: JSON order records), run in turns in the same run (without, "
            "with, without, with…). Cost: 1/rate with - 1/rate without, per run pair, median "
            "and range; CPU Δ: natsconn's CPU per message with - without (median of the run "
            "pairs); ratio: rate with / rate without. Rates count source messages (a filter's "
            "dropped ones included).", ""]
    return out


def markdown(results: list[PairResult], cond: dict[str, Any]) -> str:
    out = ["# natsconn benchmark", ""]
    out.append("| pipeline | size | count | pipeline msg/s (range) | raw consume leg | "
               "raw produce leg | ratio | target | CPU µs/msg (pipeline / raw sum) | "
               "CPU use natsconn / server | peak RSS | delivered |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r.pipeline
        if r.pair.variant:  # in the Processing table
            continue
        if r.error is not None:
            out.append(f"| {_name(r)} | {r.size} B | {r.params.count:,} | failed: "
                       f"{r.error} | - | - | - | - | - | - | - | - |")
            continue
        if r.pair.engine_only:
            target = f">= {_rate(r.pair.target_rate or 0)} msg/s: {_mark(r.holds)}"
            out.append(f"| {r.pair.name} (engine) | {r.size} B | {r.params.count:,} | "
                       f"{_range(p)} | - | - | - | {target} | "
                       f"{_us(p.stats.cpu_per_message)} / - | {p.stats.cores:.2f} / - | "
                       f"{p.stats.peak_rss / 2**20:.0f} MiB | - |")
            continue
        bc, bp = r.best_consume, r.best_produce
        consume = f"{_rate(bc.stats.rate)} ({bc.endpoint}/{bc.technique})" if bc else "-"
        produce = f"{_rate(bp.stats.rate)} ({bp.endpoint}/{bp.technique})" if bp else "-"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        raw_cpu = sum(m.stats.cpu_per_message for m in (bc, bp) if m is not None)
        cpu = f"{_us(p.stats.cpu_per_message)} / {_us(raw_cpu) if raw_cpu else '-'}"
        if r.cpu_ratio is not None:
            cpu += f" ({r.cpu_ratio:.2f}x)"
        delivered = p.stats.delivered_min
        got = "-" if delivered is None else (
            "all" if delivered >= r.params.count else f"{delivered:,} (min)")
        target = f">= {r.pair.target_ratio}: {_mark(r.holds)}" if bc or bp else "-"
        out.append(f"| {_name(r)} | {r.size} B | {r.params.count:,} | {_range(p)} | "
                   f"{consume} | {produce} | {ratio} | {target} | {cpu} | "
                   f"{p.stats.cores:.2f} / {p.stats.server_cores:.2f} | "
                   f"{p.stats.peak_rss / 2**20:.0f} MiB | {got} |")
    out += ["", "Ratio: the pipeline's median rate over the slower of the best raw consume and "
            "the best raw produce leg, measured in the same run with the same batching. "
            "CPU µs/msg: natsconn's user+sys time per message against the sum of those two "
            "legs' (target <= 1.3x). CPU use: natsconn's CPU seconds per second over the "
            "window (1.00 = one core busy throughout: CPU-bound), and nats-server's over the "
            "same window.", ""]
    out += processing(results)
    out += scaling(results)
    out += go_bridge(results)
    legs = [m for r in results for m in (*r.consume, *r.produce)]
    seen: set[str] = set()
    if legs:
        out += ["## Raw legs", "",
                "| leg | technique | size | msg/s (range) | CPU µs/msg | CPU use (client / "
                "server) | peak RSS | notes |",
                "|---|---|---|---|---|---|---|---|"]
        for m in legs:
            key = json.dumps([m.kind, m.endpoint, m.technique, m.params.to_json()])
            if key in seen:  # a leg shared by two pairs is measured once
                continue
            seen.add(key)
            notes = sorted({n for s in m.stats.samples for n in s.notes
                            if not n.startswith("fed at")})
            fed = [n for s in m.stats.samples for n in s.notes if n.startswith("fed at")]
            if fed:
                notes.append(fed[0] + " (run 1)")
            technique = m.technique + (f" {_ids_label(m.endpoint)}"
                                       if m.kind == "produce" and m.params.ids else "")
            out.append(f"| {m.kind} {m.endpoint} | {technique} | {m.params.size} B | "
                       f"{_range(m)} | {_us(m.stats.cpu_per_message)} | {m.stats.cores:.2f} / "
                       f"{m.stats.server_cores:.2f} | "
                       f"{m.stats.peak_rss / 2**20:.0f} MiB | {'; '.join(notes) or ''} |")
        out.append("")
    out += ["## Conditions", ""]
    out += [f"- {k}: {v}" for k, v in cond.items()]
    measured = [m for r in results for m in (r.pipeline, *r.consume, *r.produce,
                                              *([r.baseline] if r.baseline else []))]
    noisy = [m for m in measured if m.stats.discarded]
    loads = [m.stats.load for m in measured]
    others = [m.stats.other_cores for m in measured]
    if loads:
        out.append(f"- load average (1 min) during kept runs: up to {max(loads):.2f}; foreign "
                   f"CPU (other processes) up to {max(others):.2f} cores")
    if noisy:
        out.append(f"- {sum(len(m.stats.discarded) for m in noisy)} noisy run(s) replaced "
                   "by reruns (foreign CPU above the threshold)")
    out.append("")
    return "\n".join(out)


def write(results: list[PairResult], cond: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = {"conditions": cond, "results": [r.to_json() for r in results]}
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(data, indent=1))
    md_path = out_dir / "latest.md"
    md_path.write_text(markdown(results, cond))
    return json_path, md_path


def _measured(j: dict[str, Any]) -> Measured:
    stats = Stats([Sample.from_json(x) for x in j["samples"]],
                  [Sample.from_json(x) for x in j.get("discarded", [])])
    return Measured(j["kind"], j["endpoint"], j["technique"], Params.from_json(j["params"]),
                    stats)


def load(path: Path) -> tuple[list[PairResult], dict[str, Any]]:
    """Read a results JSON back (``python -m bench report FILE``)."""
    data = json.loads(path.read_text())
    results = []
    for r in data["results"]:
        results.append(PairResult(
            PAIRS[r["pair"]], r["size"], Params.from_json(r["params"]),
            _measured(r["pipeline"]), [_measured(m) for m in r["consume"]],
            [_measured(m) for m in r["produce"]], r.get("error"),
            _measured(r["baseline"]) if r.get("baseline") else None))
    return results, data["conditions"]
