"""A push-to-pull adapter for sources whose client delivers by callback.

Callbacks ``push``; ``read_batch`` calls ``take``. A deque with one event:
no queue machinery and no task per message on the hot path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class PushBuffer(Generic[T]):
    __slots__ = ("_arrived", "_items", "_room", "capacity")

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return self.capacity is not None and len(self._items) >= self.capacity

    def push(self, item: T) -> None:
        self._items.append(item)
        if not self._arrived.is_set():
            self._arrived.set()

    async def wait_room(self) -> None:
        """For a callback that can hold its client back (it then buffers or drops)."""
        while self.full():
            self._room.clear()
            await self._room.wait()

    async def take(self, max_items: int, max_wait: float) -> list[T]:
        """Up to ``max_items``, waiting at most ``max_wait`` for the first one."""
        items = self._items
        if not items:
            self._arrived.clear()
            if max_wait <= 0:
                return []
            try:
                await asyncio.wait_for(self._arrived.wait(), max_wait)
            except TimeoutError:
                return []
        n = min(max_items, len(items))
        out = [items.popleft() for _ in range(n)]
        if not self._room.is_set():
            self._room.set()
        return out

    def peek_all(self) -> list[T]:
        """Every buffered item, left in place."""
        return list(self._items)

    def take_all(self) -> list[T]:
        out = list(self._items)
        self._items.clear()
        self._room.set()
        return out
