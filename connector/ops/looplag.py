"""The event loop's lag: how late a timer fires, which is how long a ready
callback (a message, an ack, a write's completion) may wait for the loop.

A tick every 250 ms: the time past its deadline is observed into a histogram
and the last value kept in a gauge. It costs one timer wakeup a quarter second.
"""

from __future__ import annotations

import asyncio
import time

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


async def sample(interval: float = INTERVAL) -> None:
    """Run for ever (cancel to stop)."""
    while True:
        due = time.perf_counter() + interval
        await asyncio.sleep(interval)
        late = max(0.0, time.perf_counter() - due)
        LAG.observe(late)
        LAST.set(late)
