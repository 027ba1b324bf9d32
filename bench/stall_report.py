"""The stalled-sink results as JSON (every sample) and Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .results_io import conditions_section, write_results
from .stall import StallResult


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _backlog(r: StallResult) -> str:
    """The source's backlog at the start and the end of the stall."""
    rows = [s for s in r.samples if s["phase"] == "stalled" and s.get("backlog")]
    if not rows:
        return "-"
    first, last = rows[0]["backlog"], rows[-1]["backlog"]
    return ", ".join(f"{k} {first.get(k, 0):,} -> {last.get(k, 0):,}" for k in last)


def markdown(results: list[StallResult], cond: dict[str, Any]) -> str:
    out = ["# natsconn with a stalled sink", "",
           "| pipeline | size | preloaded | stall | RSS before / peak stalled / after | "
           "in flight max (bound) | in-flight bytes max | read while stalled | "
           "source backlog while stalled | held back | delivered after resume | drain | ok | "
           "notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            out.append(f"| {r.pair} | {r.size} B | {r.count:,} | {r.seconds:g} s | - | - | - "
                       f"| - | - | - | - | - | **no** | {r.error} |")
            continue
        held = {True: "yes", False: "**no**", None: "-"}[r.held_back]
        drain = f"{r.drain_seconds:.1f} s" if r.drain_seconds is not None else "-"
        out.append(f"| {r.pair} | {r.size} B | {r.count:,} | {r.seconds:g} s | "
                   f"{_mib(r.rss_before)} / {_mib(r.rss_peak)} / {_mib(r.rss_after)} | "
                   f"{r.in_flight_max:,} ({r.bound_messages:,}) | "
                   f"{_mib(r.in_flight_bytes_max)} | "
                   + (f"{r.read_while_stalled:,}" if r.read_while_stalled is not None else "-")
                   + f" | {_backlog(r)} | {held} | "
                   f"{r.delivered:,} | {drain} | {'yes' if r.ok else '**no**'} | "
                   f"{'; '.join(r.notes)} |")
    out += ["", "The sink's TCP connection runs through connector.testing.proxy.TcpProxy, "
            "which stops forwarding for the stall (connections stay open). RSS: natsconn's "
            "VmRSS sampled every 0.5 s (before: the last sample at full flow, once a quarter "
            "had arrived). "
            "In flight: natsconn_in_flight_messages (read, not yet acknowledged); the bound "
            "is batch.max_messages x (max_in_flight + 1). Held back: the source's own "
            "backlog (JetStream num_pending, Kafka/Redis group lag) stayed above zero all "
            "through the stall and natsconn stopped reading (natsconn_messages_in still "
            "through the second half; read while stalled: what filled its window; "
            "JetStream's num_ack_pending: "
            "what natsconn holds unacknowledged, its prefetch included). ok: every message "
            "arrived "
            "after the resume and in flight stayed within the bound.", ""]
    out += conditions_section(cond)
    return "\n".join(out)


def write(results: list[StallResult], cond: dict[str, Any],
          out_dir: Path) -> tuple[Path, Path]:
    return write_results("stall", results, cond, out_dir, markdown)
