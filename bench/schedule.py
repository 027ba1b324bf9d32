"""Open-loop sending: when each message is due, and what its payload says.

An open-loop sender sends on a fixed schedule whatever the pipeline does. Each
message carries its **intended** send time (the schedule's, not the moment
the sender got round to it): when the sender falls behind, the delay it
suffered is part of the latency measured, so a stalled system cannot hide its
stall by slowing the load down ("coordinated omission").

Payload layout: 8 bytes sequence number, 8 bytes intended send time
(``time.time_ns()``, CLOCK_REALTIME, shared by every process on the host),
both big-endian, then filler up to the message size.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

STAMP = struct.Struct(">QQ")
MIN_SIZE = STAMP.size  # 16 bytes


@dataclass(frozen=True, slots=True)
class Schedule:
    """``count`` messages at ``rate`` per second from ``start_ns`` on: message ``i``
    is due at ``start_ns + i / rate``."""

    start_ns: int
    rate: float
    count: int

    def __post_init__(self) -> None:
        if self.rate <= 0 or not math.isfinite(self.rate):
            raise ValueError(f"rate must be positive, not {self.rate}")
        if self.count < 0:
            raise ValueError("count must be >= 0")

    def intended(self, i: int) -> int:
        """When message ``i`` is due, in ns."""
        return self.start_ns + round(i * 1e9 / self.rate)

    def due(self, now_ns: int) -> int:
        """How many messages are due by ``now_ns`` (message i is due once
        ``intended(i) <= now_ns``), at most ``count``."""
        if now_ns < self.start_ns:
            return 0
        n = math.floor((now_ns - self.start_ns) * self.rate / 1e9) + 1
        # float rounding at the boundary: settle against intended() itself
        while n > 0 and self.intended(n - 1) > now_ns:
            n -= 1
        while n < self.count and self.intended(n) <= now_ns:
            n += 1
        return min(n, self.count)

    @property
    def end_ns(self) -> int:
        """When the last message is due."""
        return self.intended(max(self.count - 1, 0))

    def chunks(self, sent: int, now_ns: int, limit: int) -> list[tuple[int, int]]:
        """The messages to send now, after ``sent`` were: ``(first, count)`` chunks
        of at most ``limit`` each, covering every message due by ``now_ns``."""
        due = self.due(now_ns)
        out = []
        while sent < due:
            k = min(limit, due - sent)
            out.append((sent, k))
            sent += k
        return out


def stamp(seq: int, intended_ns: int, filler: bytes) -> bytes:
    """A payload: the stamp, then ``filler`` (size - MIN_SIZE bytes)."""
    return STAMP.pack(seq, intended_ns) + filler


def read_stamp(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(seq, intended_ns)`` from a payload made by :func:`stamp`."""
    seq, ns = STAMP.unpack_from(data)
    return int(seq), int(ns)


def level_count(rate: float, seconds: float) -> int:
    """Messages a load level sends: ``seconds`` of ``rate``, at least one."""
    return max(1, round(rate * seconds))
