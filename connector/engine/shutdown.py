"""The graceful stop shared by a pipeline and its sink lanes: a flag and a deadline.

``stop(deadline)`` stops the reads; writes may go on until the deadline, after
which they are abandoned with :class:`Stopped` and their messages come again
from the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from .._message import Message


class Stopped(Exception):
    """A write was abandoned because the shutdown deadline passed."""


class Shutdown:
    __slots__ = ("deadline", "stopping")

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.deadline: float | None = None

    def stop(self, deadline: float) -> None:
        self.deadline = deadline
        self.stopping.set()

    async def write(self, sink: Any, messages: Sequence[Message]) -> None:
        """``sink.write_batch``, abandoned with :class:`Stopped` at the deadline.

        A TimeoutError the sink raises itself (a publish ack that timed out) is a
        failure to retry, not the deadline: only the clock tells them apart.
        """
        if self.deadline is None:
            await sink.write_batch(messages)
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Stopped
        try:
            await asyncio.wait_for(sink.write_batch(messages), left)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise Stopped from None
            raise

    async def wait_or_stop(self, aw: Awaitable[object]) -> bool:
        """Await ``aw``; False (and ``aw`` cancelled) if told to stop first."""
        if self.stopping.is_set():
            if inspect.iscoroutine(aw):
                aw.close()  # never started: close it so it is not reported as leaked
            return False
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return await outcome(task)

    async def before_deadline(self, aw: Awaitable[object]) -> bool:
        """Await ``aw``; False (``aw`` cancelled) once the shutdown deadline passes.

        With no stop requested yet there is no deadline (the source ended and the
        drain waits for the last writes): a stop arriving meanwhile brings one.
        """
        task = asyncio.ensure_future(aw)
        while not task.done():
            if self.deadline is None:
                stop = asyncio.ensure_future(self.stopping.wait())
                try:
                    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                continue
            left = self.deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait({task}, timeout=left)
        return await outcome(task)

    async def sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def sleep_or_deadline(self, seconds: float) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= seconds:
                await asyncio.sleep(max(0.0, left))
                raise Stopped
        await asyncio.sleep(seconds)


async def outcome(task: asyncio.Future[object]) -> bool:
    """True if ``task`` finished (its exception, if any, raised here); otherwise
    cancel it and say False, unless it completed in the same tick as it was
    cancelled (a semaphore slot taken, a connection made)."""
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return not task.cancelled() and task.exception() is None
