"""Exponential backoff with full jitter."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` gives the wait before the next attempt: a random value between
    half of and all of ``initial * multiplier ** n``, capped at ``maximum``
    ("equal jitter": never a near-zero wait, yet replicas that failed together
    do not retry together)."""

    __slots__ = ("_attempt", "initial", "maximum", "multiplier")

    def __init__(self, initial: float, maximum: float, multiplier: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self._attempt = 0

    def next(self, at_least: float | None = None) -> float:
        ceiling = min(self.maximum, self.initial * self.multiplier**self._attempt)
        self._attempt += 1
        wait = random.uniform(ceiling / 2, ceiling)
        return max(wait, at_least or 0.0)

    def reset(self) -> None:
        self._attempt = 0
