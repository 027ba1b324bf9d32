"""What the admin API, the status page and ``natsconn status`` show of each pipeline.

A sampler reads every pipeline's counters every few seconds and keeps the
last minutes, for rates and the page's small charts; everything else is read
from the supervisor and the metrics registry when asked.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Any

from ..config.errors import SECRET_WORDS
from ..engine.supervisor import PipelineRecord, Supervisor
from . import logs
from .metrics import REGISTRY

SAMPLE_EVERY = 2.0  # seconds
KEEP = 150  # samples: five minutes


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class History:
    """Per pipeline: (time, messages read, messages written) every SAMPLE_EVERY."""

    def __init__(self) -> None:
        self.points: dict[str, deque[tuple[float, float, float]]] = {}

    def take(self, supervisor: Supervisor, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for name in list(supervisor.records):
            points = self.points.setdefault(name, deque(maxlen=KEEP))
            points.append((now, _sample("natsconn_messages_in_total", pipeline=name),
                           _sample("natsconn_messages_out_total", pipeline=name)))
        for name in [n for n in self.points if n not in supervisor.records]:
            del self.points[name]

    def rates(self, name: str, span: float = 4.0) -> tuple[float, float]:
        """Messages per second read and written over about the last ``span`` seconds."""
        points = self.points.get(name)
        if not points or len(points) < 2:
            return 0.0, 0.0
        last = points[-1]
        first = next((p for p in points if last[0] - p[0] <= span), points[0])
        if first is last:
            first = points[-2]
        dt = last[0] - first[0]
        if dt <= 0:
            return 0.0, 0.0
        return max(0.0, (last[1] - first[1]) / dt), max(0.0, (last[2] - first[2]) / dt)

    def series(self, name: str) -> list[list[float]]:
        """[time, read/s, written/s] per sample interval, oldest first."""
        points = list(self.points.get(name, ()))
        out = []
        for a, b in itertools.pairwise(points):
            dt = b[0] - a[0]
            if dt > 0:
                out.append([round(b[0], 3), round(max(0.0, b[1] - a[1]) / dt, 1),
                            round(max(0.0, b[2] - a[2]) / dt, 1)])
        return out

    async def run(self, supervisor: Supervisor) -> None:
        while True:
            self.take(supervisor)
            await asyncio.sleep(SAMPLE_EVERY)


def redact(value: Any, key: str = "") -> Any:
    """A config with every secret-looking field and every known secret hidden."""
    if key and any(w in key.lower() for w in SECRET_WORDS) and value not in (None, "", [], {}):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return logs.REDACTOR(value)
    return value


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def pipeline_status(name: str, rec: PipelineRecord, history: History,
                    with_config: bool = True) -> dict[str, Any]:
    pipe = rec.current
    spec = rec.config.spec
    state = pipe.state.value if pipe is not None else "starting"
    read_rate, write_rate = history.rates(name)
    window = pipe.window if pipe is not None else None
    out: dict[str, Any] = {
        "name": name,
        "state": state,
        "connected": state in ("running", "paused", "draining"),
        "paused": rec.paused,
        "source": {"type": spec.source.type},
        "sinks": [
            {"name": route.name, "type": route.sink.name,
             "when": route.when.source if route.when is not None else None,
             "written": _sample("natsconn_sink_messages_out_total", pipeline=name,
                                sink=route.name),
             "queued": _sample("natsconn_sink_queued_messages", pipeline=name,
                               sink=route.name),
             "dead_lettered": _sample("natsconn_sink_dead_lettered_total", pipeline=name,
                                      sink=route.name)}
            for route in rec.config.routes
        ],
        "rates": {"read_per_second": round(read_rate, 1),
                  "written_per_second": round(write_rate, 1)},
        "in_flight": {
            "messages": window.messages if window is not None else 0,
            "max_messages": window.max_messages if window is not None else 0,
            "bytes": window.bytes if window is not None else 0,
            "max_bytes": window.max_bytes if window is not None else 0,
        },
        "lag": _sample("natsconn_source_lag", pipeline=name),
        "totals": {
            "read": _sample("natsconn_messages_in_total", pipeline=name),
            "written": _sample("natsconn_messages_out_total", pipeline=name),
            "dead_lettered": _sample("natsconn_dead_lettered_total", pipeline=name),
            "filtered": _sample("natsconn_filtered_total", pipeline=name, reason="transform")
            + _sample("natsconn_filtered_total", pipeline=name, reason="unrouted"),
            "retries": _sample("natsconn_retries_total", pipeline=name),
        },
        "restarts": rec.restarts,
        "reloads": rec.reloads,
        "last_error": ({"message": logs.REDACTOR(rec.last_error), "at": _iso(rec.last_error_at)}
                       if rec.last_error is not None else None),
        "history": history.series(name),
    }
    if with_config:
        out["config"] = redact(spec.model_dump(mode="json", exclude_none=True))
    return out


def all_status(supervisor: Supervisor, history: History) -> list[dict[str, Any]]:
    return [pipeline_status(name, rec, history, with_config=False)
            for name, rec in supervisor.records.items()]
