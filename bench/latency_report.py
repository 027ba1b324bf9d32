"""The latency results as JSON (everything, histograms included) and Markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .latency import STAGE_ORDER, PairLatency
from .results_io import conditions_section, write_results


def _ms(ns: int | None) -> str:
    if ns is None:
        return "-"
    ms = ns / 1e6
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _rate(v: float) -> str:
    return f"{v / 1e3:.1f}k" if v >= 1000 else f"{v:.0f}"


def markdown(results: list[PairLatency], cond: dict[str, Any]) -> str:
    out = ["# natsconn end-to-end latency", "",
           "| pipeline | size | max msg/s | linger | sink RTT (median) | target p99 at 50% | "
           "load | offered msg/s | delivered msg/s | p50 ms | p99 ms | p99.9 ms | max ms | "
           "holds | other cores | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = (f"| {r.pair} | {r.size} B | {_rate(r.max_rate)} ({r.max_from}) | "
                f"{r.linger_ms:.0f} ms | "
                + (f"{r.round_trip_ms:.2f} ms" if r.round_trip_ms is not None else "-")
                + " | " + (f"{r.target_ms:.1f} ms" if r.target_ms is not None else "-"))
        if r.error or not r.levels:
            out.append(f"{head} | - | - | - | - | - | - | - | - | - | "
                       f"{r.error or 'no levels'} |")
            continue
        for lv in r.levels:
            h = lv.histogram
            holds = "-"
            if abs(lv.fraction - 0.5) < 1e-9 and r.holds is not None:
                holds = "yes" if r.holds else "**no**"
            out.append(f"{head} | {lv.fraction:.0%} | {_rate(lv.rate)} | "
                       f"{_rate(lv.delivered_rate)} | {_ms(h.percentile(50))} | "
                       f"{_ms(h.percentile(99))} | {_ms(h.percentile(99.9))} | {_ms(h.max)} | "
                       f"{holds} | {lv.other_cores:.2f} | {'; '.join(lv.notes)} |")
    out += ["", "Latency: arrival at a raw consumer of the sink's place minus the message's "
            "*intended* send time (open loop: the sender's schedule, so a sender that falls "
            "behind adds its delay), from a log-bucket histogram (values within 0.8 %); the "
            "first seconds of each level are left out. Other cores: CPU used by processes "
            "outside the measurement (other people's work on a shared machine). Target "
            "(issue #8): p99 at 50 % load <= linger + 2 x sink round trip + 5 ms.", ""]
    out += _stages(results)
    out += conditions_section(cond)
    return "\n".join(out)


def _stages(results: list[PairLatency]) -> list[str]:
    """Where the time went inside natsconn, per level: its batch stage histograms."""
    rows = [(r, lv) for r in results for lv in r.levels if lv.stages]
    if not rows:
        return []
    out = ["## Inside natsconn: p50 / p99 ms per stage of each written batch's oldest message "
           "(gc: collections x p99 pause ms)",
           "", "| pipeline | load | " + " | ".join(STAGE_ORDER)
           + " | batches | waited for a core |",
           "|---|---|" + "---|" * (len(STAGE_ORDER) + 2)]
    for r, lv in rows:
        cells = []
        for k in STAGE_ORDER:
            v = lv.stages.get(k)
            if v is None:
                cells.append("-")
            elif k.startswith("gc"):  # how many collections, and the p99 pause
                cells.append(f"{v['count']:,.0f} x {v['p99_ms']:.2f}")
            else:
                cells.append(f"{v['p50_ms']:.2f} / {v['p99_ms']:.2f}")
        n = lv.stages.get("total", {}).get("count", 0)
        out.append(f"| {r.pair} | {lv.fraction:.0%} | " + " | ".join(cells)
                   + f" | {n:,.0f} | {lv.runq_wait_share:.0%} |")
    out += ["", "From natsconn's `natsconn_batch_stage_seconds` (per written batch, the oldest "
            "message: batching = read to the batch full or due; queued = to its write starting; "
            "writing = to the sink's confirmation; settling = to the source's acknowledgement; "
            "total = read to acknowledged), `natsconn_event_loop_lag_seconds` (a timer every "
            "250 ms) and `natsconn_gc_pause_seconds` (gc1, gc2: collections of the middle and "
            "oldest generation), scraped at the end of each level (its warm-up included); "
            "quantiles interpolated within the histogram's buckets. Waited for a core: of the "
            "level's wall time, the share natsconn's threads were runnable but not running "
            "(/proc/PID/task/*/schedstat), which on a machine whose cores are all busy is "
            "the scheduler's part of the tail.", ""]
    return out


def write(results: list[PairLatency], cond: dict[str, Any],
          out_dir: Path) -> tuple[Path, Path]:
    return write_results("latency", results, cond, out_dir, markdown)


def load(path: Path) -> tuple[list[PairLatency], dict[str, Any]]:
    data = json.loads(path.read_text())
    return [PairLatency.from_json(r) for r in data["results"]], data["conditions"]
