"""The plain data the harness passes around: parameters, one measurement, statistics.

Everything here is JSON-serialisable, because raw legs run in worker
subprocesses that receive their parameters and return their result as JSON.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

Place = dict[str, Any]
"""Where a leg reads or writes (stream, subject, topic, table…), endpoint-defined."""


@dataclass(frozen=True, slots=True)
class Params:
    """One measurement's workload: the same for a pipeline and its raw legs."""

    size: int  # payload bytes
    count: int  # messages
    batch: int = 1000  # messages per batch (pipeline batch.max_messages, raw legs' batch)
    max_in_flight: int = 4  # concurrent batches (pipeline max_in_flight, raw produce legs)
    max_wait: float = 0.02  # pipeline linger (batch.max_wait)
    prefetch: int = 10_000  # JetStream pull window in messages (plugin default), raw leg alike
    prefetch_bytes: int = 16 * 2**20  # ... within about this many payload bytes (plugin default)
    ids: bool = False  # messages carry a source id (JetStream sink then sets Nats-Msg-Id)
    storage: str = "file"  # JetStream stream storage
    payload: str = "random"  # "json": JSON order records (natsconn_dev.orders), "seq": random
    # bytes behind a 12-digit sequence number (distinct arrivals countable), else random bytes
    workers: int = 0  # the pipeline runs as `natsconn run --workers N`; 0: without the flag
    pace: float = 0.0  # a live feed's rate in msg/s (whole batches on schedule); 0: full speed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Params:
        return cls(**data)


@dataclass(slots=True)
class Sample:
    """One timed run of one thing (a raw leg or a pipeline)."""

    messages: int  # messages inside the timed window
    seconds: float  # the window
    cpu_seconds: float  # user+sys of the measured process inside the window
    peak_rss: int  # bytes, whole life of the measured process
    delivered: int | None = None  # total that reached the far side (drops = count - this)
    load: float = 0.0  # os.getloadavg()[0] when the run ended
    other_cores: float = 0.0  # CPU used by processes outside the measurement, in cores
    server_cores: float = 0.0  # CPU the server(s) used per second of the window
    notes: list[str] = field(default_factory=list)
    started: float | None = None  # time.perf_counter() at the window's start (system-wide
    # CLOCK_MONOTONIC on Linux: comparable between processes)
    parts: dict[str, float] = field(default_factory=dict)  # CPU s in the window per member
    # of natsconn's process tree: "parent", "w0", "w1"... (--workers)
    bridge: dict[str, Any] | None = None  # the Go-bridge comparison's terms (bridge_terms())

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_message(self) -> float:
        return self.cpu_seconds / self.messages if self.messages else 0.0

    @property
    def cores(self) -> float:
        """CPU use over the window: 1.0 is one core busy all the time (CPU-bound)."""
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rate"] = self.rate
        out["cpu_per_message"] = self.cpu_per_message
        out["cores"] = self.cores
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in keys})


@dataclass(slots=True)
class Stats:
    """Median and range over the kept runs (warm-up excluded)."""

    samples: list[Sample]
    discarded: list[Sample] = field(default_factory=list)  # noisy runs replaced by reruns

    @property
    def rates(self) -> list[float]:
        return [s.rate for s in self.samples]

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.samples else 0.0

    @property
    def rate_min(self) -> float:
        return min(self.rates, default=0.0)

    @property
    def rate_max(self) -> float:
        return max(self.rates, default=0.0)

    @property
    def spread(self) -> float:
        """(max - min) / median of the rates."""
        return (self.rate_max - self.rate_min) / self.rate if self.rate else 0.0

    @property
    def cpu_per_message(self) -> float:
        return statistics.median([s.cpu_per_message for s in self.samples]) if self.samples \
            else 0.0

    @property
    def cores(self) -> float:
        return statistics.median([s.cores for s in self.samples]) if self.samples else 0.0

    @property
    def server_cores(self) -> float:
        return statistics.median([s.server_cores for s in self.samples]) if self.samples \
            else 0.0

    @property
    def peak_rss(self) -> int:
        return max((s.peak_rss for s in self.samples), default=0)

    @property
    def delivered_min(self) -> int | None:
        values = [s.delivered for s in self.samples if s.delivered is not None]
        return min(values) if values else None

    @property
    def load(self) -> float:
        return max((s.load for s in self.samples), default=0.0)

    @property
    def other_cores(self) -> float:
        return max((s.other_cores for s in self.samples), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "rate_median": self.rate,
            "rate_min": self.rate_min,
            "rate_max": self.rate_max,
            "cpu_per_message_median": self.cpu_per_message,
            "cores_median": self.cores,
            "server_cores_median": self.server_cores,
            "peak_rss_max": self.peak_rss,
            "load_max": self.load,
            "other_cores_max": self.other_cores,
            "samples": [s.to_json() for s in self.samples],
            "discarded": [s.to_json() for s in self.discarded],
        }


@dataclass(frozen=True, slots=True)
class Comparison:
    """A pipeline with transforms against the same pipeline without them, from runs
    taken in turns (without, with, without, with…): each figure is the median over
    the run pairs, with its range.

    - ``cost``: seconds the transforms add per message, 1/rate with - 1/rate without;
    - ``cpu_cost``: CPU seconds per message with - without;
    - ``ratio``: rate with / rate without.
    """

    cost: float
    cost_min: float
    cost_max: float
    cpu_cost: float
    ratio: float
    ratio_min: float
    ratio_max: float
    pairs: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(with_: list[Sample], without: list[Sample]) -> Comparison | None:
    """Pair the i-th run with transforms with the i-th without (both lists in the
    order the run pairs were kept); None when there is no pair to compare."""
    pairs = [(a, b) for a, b in zip(with_, without, strict=False) if a.rate and b.rate]
    if not pairs:
        return None
    costs = [1 / a.rate - 1 / b.rate for a, b in pairs]
    cpus = [a.cpu_per_message - b.cpu_per_message for a, b in pairs]
    ratios = [a.rate / b.rate for a, b in pairs]
    return Comparison(statistics.median(costs), min(costs), max(costs),
                      statistics.median(cpus), statistics.median(ratios), min(ratios),
                      max(ratios), len(pairs))


def parts_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each tree member used between two readings; a member that was
    not there at the first reading (a worker started or restarted meanwhile)
    counts from zero; a member gone by the second one is left out (its CPU is in
    the parent's reaped-children figure)."""
    return {k: max(0.0, v - before.get(k, 0.0)) for k, v in after.items()}


def bridge_terms(published: int, arrived: int, distinct: int | None, first_publish: float,
                 last_arrival: float, cpu: float) -> dict[str, Any]:
    """The quantities of the Go-bridge comparison: msg/s from the first publish to
    the last arrival (distinct arrivals over that time), messages lost (published
    minus arrived distinct), duplicates (records beyond the distinct ones) and the
    bridge process tree's CPU per arrived message over the same time. ``distinct``
    None: the sink cannot tell duplicates apart; every arrival counts as distinct."""
    got = arrived if distinct is None else distinct
    seconds = last_arrival - first_publish
    return {
        "published": published, "arrived": arrived, "distinct": got,
        "lost": max(0, published - got), "duplicates": max(0, arrived - got),
        "seconds": seconds, "rate": got / seconds if seconds > 0 else 0.0,
        "cpu_seconds": cpu, "cpu_per_message": cpu / got if got else 0.0,
        "distinct_checked": distinct is not None,
    }


def ceiling(cpu_per_message: float, cores: int) -> float:
    """msg/s that ``cores`` dedicated cores sustain at this CPU per message, if the
    work spreads over them evenly and nothing else (servers, a raw leg) is on them."""
    return cores / cpu_per_message if cpu_per_message > 0 else 0.0


def parse_workers(text: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]``: the ``natsconn run --workers`` counts to measure
    (each from 1 to 256, in the order given, each once)."""
    out: list[int] = []
    for part in text.split(","):
        token = part.strip()
        if not token:
            continue
        if not token.isdigit() or not 1 <= int(token) <= 256:
            raise ValueError(f"not a worker count (1 to 256): {token!r}")
        if int(token) not in out:
            out.append(int(token))
    if not out:
        raise ValueError("no worker counts given")
    return out
