"""A log-bucket latency histogram in the manner of HdrHistogram, small and pure.

Values (non-negative integers, nanoseconds here) below ``2**sub_bits`` are
kept exactly; above, each power of two is split into ``2**(sub_bits-1)``
equal buckets, so a bucket's width is at most ``1 / 2**(sub_bits-1)`` of its
values (0.8 % with the default 8 bits). Recording is one ``bit_length`` and a
dict update; the counts are sparse, so the histogram travels as JSON between
the receiving worker and the harness.
"""

from __future__ import annotations

import math
from typing import Any


class Histogram:
    __slots__ = ("_half", "count", "counts", "max", "min", "sub_bits", "total")

    def __init__(self, sub_bits: int = 8) -> None:
        if sub_bits < 1:
            raise ValueError("sub_bits must be >= 1")
        self.sub_bits = sub_bits
        self._half = 1 << (sub_bits - 1)
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0  # sum of the values, for the mean
        self.min: int | None = None
        self.max: int | None = None

    # ---- buckets

    def index(self, value: int) -> int:
        """The bucket of ``value``; buckets are contiguous and ordered by value."""
        if value < 0:
            raise ValueError(f"negative value {value}")
        shift = value.bit_length() - self.sub_bits
        if shift <= 0:
            return value
        return shift * self._half + (value >> shift)

    def bounds(self, index: int) -> tuple[int, int]:
        """The lowest and highest value that fall in bucket ``index``."""
        if index < 2 * self._half:
            return index, index
        shift = index // self._half - 1
        mantissa = index - shift * self._half
        return mantissa << shift, ((mantissa + 1) << shift) - 1

    # ---- recording

    def record(self, value: int, times: int = 1) -> None:
        value = max(0, value)  # a clock step backwards must not break the histogram
        i = self.index(value)
        self.counts[i] = self.counts.get(i, 0) + times
        self.count += times
        self.total += value * times
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def merge(self, other: Histogram) -> None:
        if other.sub_bits != self.sub_bits:
            raise ValueError("histograms of different precision")
        for i, n in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + n
        self.count += other.count
        self.total += other.total
        for v in (other.min, other.max):
            if v is not None:
                self.min = v if self.min is None else min(self.min, v)
                self.max = v if self.max is None else max(self.max, v)

    # ---- reading

    def percentile(self, p: float) -> int | None:
        """The value at or below which ``p`` percent of the recorded values lie: the
        highest value of the bucket holding that rank (as HdrHistogram reports it),
        never above the largest value recorded; ``p`` 0 is the smallest. None when
        empty."""
        if not 0 <= p <= 100:
            raise ValueError(f"percentile {p} outside 0..100")
        if not self.count:
            return None
        if p == 0:
            return self.min
        rank = max(1, math.ceil(round(p / 100 * self.count, 6)))  # 99.9% of 1000 is 999
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                high = self.bounds(i)[1]
                assert self.max is not None
                return min(high, self.max)
        return self.max

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def summary(self, percentiles: tuple[float, ...] = (50, 99, 99.9)) -> dict[str, Any]:
        out: dict[str, Any] = {f"p{p:g}": self.percentile(p) for p in percentiles}
        out.update(count=self.count, min=self.min, max=self.max, mean=self.mean)
        return out

    # ---- JSON

    def to_json(self) -> dict[str, Any]:
        return {"sub_bits": self.sub_bits, "counts": {str(k): v for k, v in self.counts.items()},
                "count": self.count, "total": self.total, "min": self.min, "max": self.max}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        h = cls(int(data["sub_bits"]))
        h.counts = {int(k): int(v) for k, v in data["counts"].items()}
        h.count, h.total = int(data["count"]), int(data["total"])
        h.min, h.max = data["min"], data["max"]
        return h
