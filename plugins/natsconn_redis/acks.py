"""Acknowledgements that return at once: one round trip at a time carries them all.

The engine settles the source batches of a written sink batch one after
another, and a sink batch may span dozens of reads. When each ack is a round
trip (XACK, LREM), the write that finished holds the in-flight window for
all of them in turn (``settling`` in ``natsconn_batch_stage_seconds``: 87 ms
at p99 for a Redis stream at half load, 1 ms once coalesced). A source's ack
instead queues what it acknowledges here and returns; one task sends every
item queued until then in one pipelined round trip, then the next lot.

``send`` owns the failure: it is called with a lot and must log what it could
not acknowledge (a Redis source leaves it where another read, or the next
start, takes it back: at least once). ``close()`` of the source waits for the
queue with :meth:`AckQueue.flush` before it gives up its claim on what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class AckQueue(Generic[T]):
    __slots__ = ("_log", "_name", "_queued", "_send", "_task")

    def __init__(self, send: Callable[[list[T]], Awaitable[None]], name: str,
                 log: logging.Logger) -> None:
        self._send = send
        self._name = name
        self._log = log
        self._queued: list[T] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, items: Iterable[T]) -> None:
        """Queue ``items`` for the next round trip and return."""
        self._queued.extend(items)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while self._queued:
            lot, self._queued = self._queued, []
            try:
                await self._send(lot)
            except Exception:  # send logs its own failures; this is a bug's last word
                self._log.exception("%s: acknowledging %d item(s) failed", self._name,
                                    len(lot))

    async def sent(self) -> None:
        """Wait until everything queued so far has been sent (or failed)."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def flush(self, timeout: float) -> None:
        """:meth:`sent` within ``timeout`` seconds; what is still queued after that
        stays unacknowledged (the server delivers it again)."""
        with contextlib.suppress(Exception):  # TimeoutError, or the task's failure
            await asyncio.wait_for(self.sent(), timeout)
