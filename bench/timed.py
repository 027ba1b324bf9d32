"""Timed traffic for the latency and stall runs: open-loop senders, receivers that
stamp arrivals into a histogram, and single round trips, per endpoint.

These run in worker processes (``python -m bench.worker``), like the raw legs.
Each system's module in ``bench/probes/`` registers, by endpoint name:

- a **sender** for a source's place: ``async (env, place, params, schedule) -> dict``,
  built on :func:`open_loop` with a ``write(payloads)`` for its client;
- a **receiver** for a sink's place, a raw consumer of what natsconn wrote:
  ``async (env, place, params, arrivals, ready) -> None``, feeding
  :class:`Arrivals` until it is done;
- a **round trip**: ``async (env, place, params, n) -> list[int]`` (ns), one
  write and its acknowledgement at a time with the raw client: the sink's
  round trip against which the latency target is set.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .endpoint import Ready
from .hdr import Histogram
from .model import Params, Place
from .schedule import MIN_SIZE, Schedule, read_stamp, stamp

Write = Callable[[list[bytes]], Awaitable[None]]
Sender = Callable[[dict[str, str], Place, Params, Schedule], Awaitable[dict[str, Any]]]
Receiver = Callable[[dict[str, str], Place, Params, "Arrivals", Ready], Awaitable[None]]
RoundTrip = Callable[[dict[str, str], Place, Params, int], Awaitable[list[int]]]

SENDERS: dict[str, Sender] = {}
RECEIVERS: dict[str, Receiver] = {}
ROUND_TRIPS: dict[str, RoundTrip] = {}

CHUNK = 1000  # most messages one write() gets when the sender has fallen behind


def sender(name: str) -> Callable[[Sender], Sender]:
    def register(fn: Sender) -> Sender:
        SENDERS[name] = fn
        return fn
    return register


def receiver(name: str) -> Callable[[Receiver], Receiver]:
    def register(fn: Receiver) -> Receiver:
        RECEIVERS[name] = fn
        return fn
    return register


def round_trip(name: str) -> Callable[[RoundTrip], RoundTrip]:
    def register(fn: RoundTrip) -> RoundTrip:
        ROUND_TRIPS[name] = fn
        return fn
    return register


async def time_each(n: int, op: Callable[[], Awaitable[object]]) -> list[int]:
    """``op`` run ``n`` times one after the other; each one's duration in ns."""
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        await op()
        out.append(clock() - t0)
    return out


async def open_loop(schedule: Schedule, size: int, write: Write,
                    limit: int = CHUNK) -> dict[str, Any]:
    """Send ``schedule`` through ``write``: whatever is due, stamped with its intended
    time, then sleep until the next message is due. The event loop's timers tick
    about every millisecond, so messages go out in small chunks; the sender's own
    delay is in the latency measured (the stamps are the intended times)."""
    filler = os.urandom(max(0, size - MIN_SIZE))
    intended = schedule.intended
    sent = 0
    lag_max = 0
    t0 = time.perf_counter()
    while sent < schedule.count:
        now = time.time_ns()
        chunks = schedule.chunks(sent, now, limit)
        if not chunks:
            # At least 1 ms: the event loop's timers have millisecond resolution
            # (uvloop rounds a shorter sleep down to none), and a sender spinning
            # through zero-length sleeps takes a core from the pipeline it measures.
            await asyncio.sleep(max(0.001, (intended(sent) - now) / 1e9))
            continue
        for first, k in chunks:
            await write([stamp(i, intended(i), filler) for i in range(first, first + k)])
            sent += k
        lag_max = max(lag_max, time.time_ns() - intended(sent - 1))
    seconds = time.perf_counter() - t0
    return {"sent": sent, "seconds": seconds, "rate": sent / seconds if seconds else 0.0,
            "lag_max_ns": lag_max, "cpu_seconds": time.process_time()}


class Arrivals:
    """What a receiver saw: end-to-end latency per message (arrival - intended send
    time) into a histogram, except the first ``skip`` messages (warm-up: connections,
    consumer group joins); duplicates by sequence number; when it is done."""

    def __init__(self, expect: int, skip: int = 0, idle: float = 5.0) -> None:
        self.expect = expect
        self.skip = skip
        self.idle = idle  # done this long after the last arrival, once something arrived
        self.histogram = Histogram()
        self._seen = bytearray(expect)
        self.received = 0  # distinct messages
        self.duplicates = 0
        self.foreign = 0  # payloads without our stamp (not counted)
        self.first_ns = 0
        self.last_ns = 0
        self._done = asyncio.Event()

    def add(self, data: bytes | bytearray | memoryview, now_ns: int) -> None:
        if len(data) < MIN_SIZE:
            self.foreign += 1
            return
        seq, intended = read_stamp(data)
        if seq >= self.expect:
            self.foreign += 1
            return
        if self._seen[seq]:
            self.duplicates += 1
            return
        self._seen[seq] = 1
        self.received += 1
        if not self.first_ns:
            self.first_ns = now_ns
        self.last_ns = now_ns
        if seq >= self.skip:
            self.histogram.record(now_ns - intended)
        if self.received >= self.expect:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self, deadline: float) -> None:
        """Until every message arrived, or ``idle`` seconds passed without one (after
        the first), or ``deadline`` seconds in all."""
        end = time.monotonic() + deadline
        last = -1
        while not self._done.is_set() and time.monotonic() < end:
            try:
                await asyncio.wait_for(self._done.wait(), self.idle)
            except TimeoutError:
                if self.received == last and self.received > 0:
                    return
                last = self.received

    def result(self) -> dict[str, Any]:
        seconds = (self.last_ns - self.first_ns) / 1e9
        return {"expect": self.expect, "received": self.received,
                "duplicates": self.duplicates, "foreign": self.foreign, "skip": self.skip,
                "seconds": seconds,
                "rate": (self.received - 1) / seconds if seconds > 0 else 0.0,
                "histogram": self.histogram.to_json(),
                "cpu_seconds": time.process_time()}
