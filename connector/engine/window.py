"""The bound on messages and bytes read but not yet acknowledged.

A plain counter pair with one event: cheaper than a queue, and it is what makes
a slow sink stop the reads (backpressure) while memory stays flat.
"""

from __future__ import annotations

import asyncio


class Window:
    __slots__ = ("_room", "bytes", "max_bytes", "max_messages", "messages")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    def room(self) -> int:
        """How many messages may be read now (0 when full)."""
        if self.bytes >= self.max_bytes:
            return 0
        return max(0, self.max_messages - self.messages)

    async def wait_room(self) -> None:
        while self.room() == 0:
            self._room.clear()
            await self._room.wait()

    async def wait_empty(self) -> None:
        while self.messages > 0:
            self._room.clear()
            await self._room.wait()

    def take(self, messages: int, nbytes: int) -> None:
        self.messages += messages
        self.bytes += nbytes

    def release(self, messages: int, nbytes: int) -> None:
        self.messages -= messages
        self.bytes -= nbytes
        self._room.set()
