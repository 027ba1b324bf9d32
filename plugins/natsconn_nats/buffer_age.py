"""How long the oldest prefetched message has waited, cheaply.

A JetStream consumer's ``ack_wait`` runs from delivery, and a prefetched
message waits in the source's buffer until the engine reads it. When the sink
stalls the buffer stops draining, and without a word from us the server would
redeliver every buffered message once ``ack_wait`` passes: a duplicate of each
for sinks that do not deduplicate. The source therefore tells the server the
buffered messages are still in hand (``+WPI``) before that.

Keeping a timestamp per message would cost on the hot path; instead a mark
``(time, messages pushed so far)`` is taken once per tick. A message with index
``i`` (counting every message pushed) arrived before the first mark whose count
exceeds ``i``, so the oldest unread one (index = messages taken) has waited at
least ``now - that mark's time``, and at most one tick more.
"""

from __future__ import annotations

from collections import deque


class BufferAge:
    __slots__ = ("_marks", "pushed", "taken")

    def __init__(self) -> None:
        self.pushed = 0  # messages pushed into the buffer, ever (as of the last tick)
        self.taken = 0  # messages taken out of it, ever
        self._marks: deque[tuple[float, int]] = deque()

    def mark(self, now: float) -> None:
        """Once per tick."""
        if not self._marks or self._marks[-1][1] != self.pushed:
            self._marks.append((now, self.pushed))

    def oldest_wait(self, now: float) -> float:
        """At least how long the oldest message still in the buffer has waited
        (0 when the buffer is empty or its messages came after the last mark)."""
        marks = self._marks
        while marks and marks[0][1] <= self.taken:
            marks.popleft()
        if not marks or self.taken >= self.pushed:
            return 0.0
        return now - marks[0][0]

    def refreshed(self, now: float) -> None:
        """Every buffered message's clock was restarted at ``now``."""
        self._marks.clear()
        self._marks.append((now, self.pushed))
