"""Re-batching transformed messages to the sink's policy (count, bytes, linger)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .._message import Message
from .tracker import Tracker


class SinkBatch:
    """Messages for one write, with the source batches they came from.

    ``spans`` holds ``(tracker, start, end)``: messages[start:end] belong to
    that tracker, so a failed index maps back to its source batch.
    """

    __slots__ = ("closed_at", "messages", "nbytes", "resolved", "spans", "unresolved")

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.spans: list[tuple[Tracker, int, int]] = []
        self.nbytes = 0
        # Per index: 1 once written, dead-lettered or given up, so that no message
        # is resolved twice whatever path (retry, dead letter, shutdown) gets there.
        self.resolved: bytearray | None = None
        self.unresolved = 0
        self.closed_at = 0.0  # perf_counter when it was full or due (stage timing)

    def add(self, messages: list[Message], tracker: Tracker, nbytes: int) -> None:
        start = len(self.messages)
        self.messages.extend(messages)
        self.spans.append((tracker, start, len(self.messages)))
        self.nbytes += nbytes
        self.unresolved += len(messages)

    def claim(self, indices: Sequence[int] | range) -> list[int]:
        """Mark ``indices`` resolved; return those that were not already."""
        flags = self.resolved
        if flags is None:
            flags = self.resolved = bytearray(len(self.messages))
        fresh = [i for i in indices if not flags[i]]
        for i in fresh:
            flags[i] = 1
        self.unresolved -= len(fresh)
        return fresh

    def claim_all(self) -> bool:
        """Mark every index resolved if none was yet; False if some already were."""
        if self.resolved is not None or self.unresolved != len(self.messages):
            return False
        self.resolved = bytearray(b"\x01" * len(self.messages))
        self.unresolved = 0
        return True

    def owner(self, index: int) -> Tracker:
        for tracker, start, end in self.spans:
            if start <= index < end:
                return tracker
        raise IndexError(index)

    def __len__(self) -> int:
        return len(self.messages)


class Batcher:
    __slots__ = ("_current", "_started", "max_bytes", "max_messages", "max_wait")

    def __init__(self, max_messages: int, max_bytes: int, max_wait: float) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self._current: SinkBatch | None = None
        self._started = 0.0

    def add(self, messages: list[Message], tracker: Tracker,
            nbytes_all: int | None = None) -> list[SinkBatch]:
        """Add a chunk; return the batches that are now full (by count or bytes).
        ``nbytes_all``, when the caller knows it, is the chunk's payload bytes."""
        full: list[SinkBatch] = []
        i, n = 0, len(messages)
        while i < n:
            if self._current is None:
                self._current = SinkBatch()
                self._started = time.monotonic()
            current = self._current
            j = min(n, i + self.max_messages - len(current))
            whole = i == 0 and j == n
            part = messages if whole else messages[i:j]
            nbytes = (nbytes_all if whole and nbytes_all is not None
                      else sum(len(m.data) for m in part))
            if current.nbytes + nbytes > self.max_bytes:
                # Take what fits by bytes; a lone oversized message still goes alone,
                # and the sink decides whether it is too large.
                budget = self.max_bytes - current.nbytes
                k, taken = i, 0
                while k < j and taken + len(messages[k].data) <= budget:
                    taken += len(messages[k].data)
                    k += 1
                if k == i and not current.messages:
                    k, taken = i + 1, len(messages[i].data)
                if k > i:
                    current.add(messages[i:k], tracker, taken)
                full.append(current)
                self._current = None
                i = k
                continue
            current.add(part, tracker, nbytes)
            i = j
            if len(current) >= self.max_messages or current.nbytes >= self.max_bytes:
                full.append(current)
                self._current = None
        return full

    def time_left(self) -> float | None:
        """Seconds until the partial batch is due; None when there is none."""
        if self._current is None:
            return None
        return max(0.0, self._started + self.max_wait - time.monotonic())

    def flush(self) -> SinkBatch | None:
        batch, self._current = self._current, None
        return batch
