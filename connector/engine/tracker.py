"""Per source batch: how many of its messages are still unresolved, and the verdict.

A source batch may be split by transforms and spread over several sink
batches; it is acknowledged once, when its last message is written or
dead-lettered.
"""

from __future__ import annotations

import time

from .._batch import AckHandle


class Tracker:
    __slots__ = (
        "ack",
        "failed",
        "failed_delay",
        "nbytes",
        "read_at",
        "read_count",
        "remaining",
        "term_reason",
    )

    def __init__(self, ack: AckHandle, read_count: int, nbytes: int) -> None:
        self.ack = ack
        self.read_count = read_count  # messages as read, for the in-flight window
        self.nbytes = nbytes
        self.remaining = 0  # messages after transforms, set by the pipeline
        self.failed = False
        self.failed_delay: float | None = None
        self.term_reason: str | None = None
        self.read_at = time.perf_counter()  # when the engine took the batch (stage timing)

    def fail(self, delay: float | None) -> None:
        """At least one message could not be written: the batch must come again."""
        self.failed = True
        self.failed_delay = delay

    def terminate(self, reason: str) -> None:
        """A message was rejected and there is no dead-letter target."""
        if self.term_reason is None:
            self.term_reason = reason

    def done(self, count: int) -> bool:
        """Resolve ``count`` messages; True when the whole batch is resolved."""
        self.remaining -= count
        return self.remaining <= 0

    async def settle(self) -> str:
        """Tell the source; returns what was done: ack, nack or term."""
        if self.failed:
            await self.ack.nack(self.failed_delay)
            return "nack"
        if self.term_reason is not None:
            await self.ack.term(self.term_reason)
            return "term"
        await self.ack.ack()
        return "ack"
