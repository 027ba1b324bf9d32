"""Which offsets of a partition may be committed, given acks in any order.

Every read hands the engine one :class:`Chunk` per partition: the records of
that partition in the batch, in offset order. Chunks are kept in read order;
the commit point moves past a chunk only when it and every chunk before it
were acknowledged, so an out-of-order ack never commits past a gap.

A nack makes the partition read again from the nacked chunk: that chunk and
every later one are dropped (their late acks are ignored) and the caller
seeks the partition back. A revoked partition's tracker is retired: late acks
of its chunks are ignored and nothing more of it is committed by this
instance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class Chunk:
    """Records ``first``..``last`` (``count`` of them) of one partition in one batch."""

    __slots__ = ("acked", "count", "first", "live", "next", "tracker")

    def __init__(self, tracker: PartitionTracker, first: int, last: int, count: int) -> None:
        self.tracker = tracker
        self.first = first
        self.next = last + 1  # the offset to commit once this chunk is done
        self.count = count
        self.acked = False
        self.live = True  # False once dropped by a nack or a revoke


class PartitionTracker:
    """Read and acknowledged offsets of one assigned partition."""

    __slots__ = ("_chunks", "commit_to", "committed", "live", "next_read", "pending", "tp")

    def __init__(self, tp: Hashable = None) -> None:
        self.tp = tp  # the caller's name for the partition
        self._chunks: deque[Chunk] = deque()
        self.pending = 0  # messages read and not yet committable (behind the first unacked)
        self.commit_to: int | None = None  # highest contiguous acknowledged offset + 1
        self.committed: int | None = None  # what was last committed successfully
        self.next_read: int | None = None  # offset after the last record read
        self.live = True

    def read(self, first: int, last: int, count: int) -> Chunk:
        chunk = Chunk(self, first, last, count)
        self._chunks.append(chunk)
        self.pending += count
        self.next_read = last + 1
        return chunk

    def ack(self, chunk: Chunk) -> None:
        """The engine is done with ``chunk`` (written, dead-lettered or terminated)."""
        if not (chunk.live and self.live) or chunk.acked:
            return
        chunk.acked = True
        chunks = self._chunks
        while chunks and chunks[0].acked:
            done = chunks.popleft()
            done.live = False
            self.pending -= done.count
            self.commit_to = done.next

    def nack(self, chunk: Chunk) -> int | None:
        """``chunk`` must be read again: returns the offset to seek to, or ``None``
        when the chunk was already dropped (an earlier nack or a revoke)."""
        if not (chunk.live and self.live):
            return None
        chunks = self._chunks
        while chunks:
            dropped = chunks.pop()
            dropped.live = False
            self.pending -= dropped.count
            if dropped is chunk:
                break
        self.next_read = chunk.first
        return chunk.first

    def to_commit(self) -> int | None:
        """The offset to commit now, or ``None`` when nothing new is acknowledged."""
        if self.commit_to is None or self.commit_to == self.committed:
            return None
        return self.commit_to

    def retire(self) -> None:
        """The partition was revoked: ignore every later ack of its chunks."""
        self.live = False
        for chunk in self._chunks:
            chunk.live = False
        self._chunks.clear()
        self.pending = 0
