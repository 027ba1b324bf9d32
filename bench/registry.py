"""Which endpoints and pipeline pairs exist: filled by the modules in bench/legs/.

Each ``bench/legs/<system>.py`` calls :func:`endpoint` on its Endpoint
classes and :func:`pair` for the pipelines worth measuring. A module that
fails to import (a client library not installed) is recorded, not fatal:
its pairs are reported as unavailable.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, replace
from typing import Any

from .endpoint import Endpoint

ENDPOINTS: dict[str, type[Endpoint]] = {}
PAIRS: dict[str, Pair] = {}
BROKEN: dict[str, str] = {}  # module -> import error


@dataclass(frozen=True, slots=True)
class Pair:
    """A pipeline ``source → sink`` to measure against its raw legs.

    ``engine_only`` pairs (generate → drop) have no raw legs and no far side;
    they are judged by ``target_rate`` alone. Bridge pairs are judged by the
    ratio of the pipeline to its slower raw leg (``target_ratio``).

    A **variant** (``variant="filter"``, named ``generate->drop+filter``) is the
    same pipeline with ``transforms``; it is measured beside its
    :attr:`baseline` (the pipeline without them, on the same payloads, in the
    same run) instead of against raw legs, and judged by the transforms' cost
    per message (``target_cost``, µs: 1/rate with - 1/rate without) or by its
    rate over the baseline's (``target_ratio``). ``payload="json"``: the
    messages are small JSON order records (natsconn_dev.orders) instead of
    random bytes, for the baseline too.
    """

    source: str
    sink: str
    count: int = 200_000  # messages per run (full)
    quick_count: int = 30_000  # messages per run with --quick (10,000 were gone by the
    # first poll of a fast pair, and CPU time is read in 10 ms ticks)
    engine_only: bool = False
    target_rate: float | None = None
    target_ratio: float | None = 0.8
    default: bool = True  # measured when --pairs is not given
    variant: str = ""  # a name for these transforms: the pair is "source->sink+variant"
    transforms: tuple[dict[str, Any], ...] = ()  # the pipeline's transforms: blocks
    payload: str = "random"  # "json": JSON order records (generate payload: json, preloads)
    target_cost: float | None = None  # variants: most µs per message the transforms may add
    min_size: int = 0  # smaller --sizes are skipped (a 10-field record needs the room)
    about: str = ""  # one line for the report: what the transforms do

    @property
    def name(self) -> str:
        base = f"{self.source}->{self.sink}"
        return f"{base}+{self.variant}" if self.variant else base

    @property
    def baseline(self) -> Pair | None:
        """A variant's pipeline without its transforms (same payloads); None for a
        plain pair."""
        if not self.variant:
            return None
        return replace(self, variant="", transforms=(), target_cost=None, about="",
                       target_ratio=None, default=False)


def endpoint(cls: type[Endpoint]) -> type[Endpoint]:
    """Register an endpoint class (usable as a decorator)."""
    if cls.name in ENDPOINTS and ENDPOINTS[cls.name] is not cls:
        raise ValueError(f"endpoint {cls.name!r} registered twice")
    ENDPOINTS[cls.name] = cls
    return cls


def pair(p: Pair) -> Pair:
    PAIRS[p.name] = p
    return p


def load_all() -> None:
    """Import every module of bench.legs (endpoints, raw legs, pairs) and of
    bench.probes (timed senders and receivers) once."""
    from . import legs, probes

    for package in (legs, probes):
        for info in pkgutil.iter_modules(package.__path__):
            module = f"{package.__name__}.{info.name}"
            try:
                importlib.import_module(module)
            except ImportError as exc:
                BROKEN[module] = f"{type(exc).__name__}: {exc}"


def parse_pair(text: str) -> str:
    """Accept ``a:b`` (no shell quoting needed), ``a->b`` or ``a→b``; return ``a->b``."""
    for sep in ("->", "→", ":"):
        if sep in text:
            a, _, b = text.partition(sep)
            return f"{a.strip()}->{b.strip()}"
    raise ValueError(f"expected SOURCE:SINK, found {text!r}")
