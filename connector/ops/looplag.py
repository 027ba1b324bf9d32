"""The event loop's lag and the garbage collector's pauses.

The lag is how late a timer fires, which is how long a ready callback (a
message, an ack, a write's completion) may wait for the loop: a tick every
250 ms, the time past its deadline observed into a histogram and the last
value kept in a gauge. It costs one timer wakeup a quarter second.

A pause is one collection of the cyclic garbage collector, which holds the
loop for its whole length (a full collection walks every tracked object the
process holds, in-flight messages included). ``gc.callbacks`` times each one,
by generation; that costs two calls per collection.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from prometheus_client import Gauge, Histogram

from .metrics import REGISTRY

INTERVAL = 0.25

LAG = Histogram(
    "natsconn_event_loop_lag_seconds", "How late the event loop ran a timer (sampled every "
    "250 ms)", registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
LAST = Gauge("natsconn_event_loop_lag_last_seconds", "The event loop's lag at the last sample",
             registry=REGISTRY, multiprocess_mode="livemax")
GC_PAUSE = Histogram(
    "natsconn_gc_pause_seconds", "Collections of Python's cyclic garbage collector and how "
    "long each held the process, by generation", ("generation",), registry=REGISTRY,
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


async def sample(interval: float = INTERVAL) -> None:
    """Run for ever (cancel to stop)."""
    while True:
        due = time.perf_counter() + interval
        await asyncio.sleep(interval)
        late = max(0.0, time.perf_counter() - due)
        LAG.observe(late)
        LAST.set(late)


class _GcTimer:
    def __init__(self) -> None:
        self._started = 0.0
        self._children = [GC_PAUSE.labels(str(g)) for g in range(3)]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._children[info["generation"]].observe(time.perf_counter() - self._started)


_timer: _GcTimer | None = None


def time_collections() -> None:
    """Time every collection of this process from now on (idempotent)."""
    global _timer
    if _timer is None:
        _timer = _GcTimer()
        gc.callbacks.append(_timer)
