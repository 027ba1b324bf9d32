"""One sink of a pipeline: its batcher, its write slots, its retries, its dead letter.

A pipeline has one lane per sink (``sink:`` gives one, ``sinks:`` several).
The reader hands each lane the messages routed to it; the lane groups them by
its own batch policy and writes up to ``max_in_flight`` batches at once. Full
batches wait in the lane's queue while every slot is busy: the reader is never
blocked by one lane, so a stalled sink holds the others back only through the
pipeline's shared in-flight window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .._errors import PartialWriteError, RejectedError, RetryableError
from .._expr import Expression
from .._message import Message
from .._plugin import Rejected
from ..config.model import BatchPolicy, RetryPolicy
from ..ops.metrics import PipelineMetrics, SinkMetrics
from ..ops.tracing import WriteTracer
from .backoff import Backoff
from .batcher import Batcher, SinkBatch
from .chain import TransformChain
from .deadletter import DeadLetter
from .shutdown import Shutdown, Stopped
from .tracker import Tracker

Settle = Callable[[Tracker], Awaitable[None]]


class SinkLane:
    def __init__(self, name: str, sink: Any, *, when: Expression | None, chain: TransformChain,
                 batch: BatchPolicy, max_in_flight: int, retry: RetryPolicy,
                 dead_letter: DeadLetter, pipeline: str, metrics: PipelineMetrics,
                 shutdown: Shutdown, settle: Settle, log: logging.Logger,
                 tracer: WriteTracer | None = None, distinct_letters: bool = False) -> None:
        self.name = name
        self.sink = sink
        self.when = when
        self.chain = chain
        self.max_in_flight = max_in_flight
        self.batcher = Batcher(batch.max_messages, batch.max_bytes, batch.max_wait)
        self.sink_metrics = SinkMetrics(pipeline, name)
        self.dead_letter = dead_letter.for_sink(name, self.sink_metrics.dead_lettered,
                                                distinct_letters)
        self.tasks: set[asyncio.Task[None]] = set()
        self._retry = retry
        self._pipeline = pipeline
        self._metrics = metrics
        self._shutdown = shutdown
        self._settle = settle
        self._log = log
        self._queue: deque[SinkBatch] = deque()
        self._busy = 0  # writes holding a slot
        self.tracer = tracer

    # ------------------------------------------------------------ taking work

    def add(self, messages: list[Message], tracker: Tracker, nbytes: int | None = None) -> None:
        for full in self.batcher.add(messages, tracker, nbytes):
            self._submit(full)

    def reject(self, rejected: list[Rejected], tracker: Tracker) -> None:
        """Poison found by this lane's transforms: dead-letter it beside the flow."""
        self._track(asyncio.create_task(reject(self.dead_letter, rejected, tracker,
                                               self.resolve)))

    def time_left(self) -> float | None:
        return self.batcher.time_left()

    def flush(self) -> bool:
        """Send the partial batch on its way; True if there was one."""
        partial = self.batcher.flush()
        if partial is None:
            return False
        self._submit(partial)
        return True

    def _submit(self, batch: SinkBatch) -> None:
        batch.closed_at = time.perf_counter()
        if self._busy < self.max_in_flight and not self._shutdown.stopping.is_set():
            self._start(batch)
        else:
            # Kept for a free slot; on a stop, for the drain (written before the
            # deadline or given back to the source).
            self._queue.append(batch)
            self.sink_metrics.queued.inc(len(batch))

    def _start(self, batch: SinkBatch) -> None:
        self._busy += 1
        task = asyncio.create_task(self._write(batch))
        self.tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            self._busy -= 1
            if not t.cancelled() and not isinstance(t.exception(), Stopped | None):
                self._log.error("write task failed", exc_info=t.exception())
            if self._queue and not self._shutdown.stopping.is_set():
                self._start(self._dequeue())

        task.add_done_callback(finished)

    def _dequeue(self) -> SinkBatch:
        batch = self._queue.popleft()
        self.sink_metrics.queued.dec(len(batch))
        return batch

    def _track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and not isinstance(t.exception(), Stopped | None):
                self._log.error("dead-letter task failed", exc_info=t.exception())

        task.add_done_callback(finished)

    # ---------------------------------------------------------------- writing

    async def _write(self, batch: SinkBatch) -> None:
        """Write with retries; dead-letter what cannot be written; settle trackers."""
        pending: list[int] | None = None  # None: the whole batch
        retry = self._retry
        backoff = Backoff(retry.initial_backoff, retry.max_backoff, retry.multiplier)
        attempt = 0
        max_attempts = retry.max_attempts
        begun = time.perf_counter()
        try:
            while True:
                attempt += 1
                messages = batch.messages if pending is None else [
                    batch.messages[i] for i in pending
                ]
                started = time.perf_counter()
                try:
                    await self._send(messages)
                except PartialWriteError as exc:
                    index = range(len(batch)) if pending is None else pending
                    failed = exc.failed
                    written = [index[i] for i in range(len(messages)) if i not in failed]
                    await self._written(batch, written)
                    poison = [(index[i], e) for i, e in failed.items()
                              if isinstance(e, RejectedError)]
                    if poison:
                        await self.dead_letter.send(batch, poison, attempt, "rejected",
                                                    self.resolve)
                    again = [(index[i], e) for i, e in failed.items()
                             if not isinstance(e, RejectedError)]
                    if not again:
                        return
                    pending = [i for i, _ in again]
                    error: Exception = again[0][1]
                except RejectedError as exc:
                    index = range(len(batch)) if pending is None else pending
                    await self.dead_letter.send(batch, [(i, exc) for i in index], attempt,
                                                "rejected", self.resolve)
                    return
                except Stopped:
                    raise
                except Exception as exc:
                    error = exc
                    if not isinstance(exc, RetryableError):
                        self._log.warning("sink raised %s, treating it as retryable",
                                          type(exc).__name__, exc_info=True)
                else:
                    done = time.perf_counter()
                    elapsed = done - started
                    self._metrics.write_seconds.observe(elapsed)
                    sm = self.sink_metrics
                    sm.write_seconds.observe(elapsed)
                    self._metrics.batches.inc()
                    sm.batches.inc()
                    await self._written(batch, range(len(batch)) if pending is None else pending)
                    # Stage timing of the batch's oldest message (its first span).
                    settled = time.perf_counter()
                    read_at = batch.spans[0][0].read_at
                    sm.batching.observe(batch.closed_at - read_at)
                    sm.waiting.observe(begun - batch.closed_at)
                    sm.writing.observe(done - begun)
                    sm.settling.observe(settled - done)
                    sm.total.observe(settled - read_at)
                    return
                # A retryable failure of ``pending`` (or all).
                if max_attempts is not None and attempt >= max_attempts:
                    index = range(len(batch)) if pending is None else pending
                    await self.dead_letter.send(batch, [(i, error) for i in index], attempt,
                                                "exhausted", self.resolve)
                    return
                self._metrics.retries.inc()
                self.sink_metrics.retries.inc()
                retry_after = error.retry_after if isinstance(error, RetryableError) else None
                wait = backoff.next(retry_after)
                self._log.warning("write of %d message(s) to %s failed (attempt %d), retrying "
                                  "in %.2fs: %s", len(messages), self.name, attempt, wait, error,
                                  extra={"pipeline": self._pipeline})
                await self._shutdown.sleep_or_deadline(wait)
        except (Stopped, asyncio.CancelledError):
            # Shutdown deadline: whatever is unwritten comes again from the source.
            await self.unwritten(batch)
            raise
        except Exception:
            # A bug (a PartialWriteError naming an index the batch lacks, a failing
            # dead-letter header...): give the batch back to the source rather than
            # leave it unsettled, which would hold the window and stall the reads.
            self._log.error("write task failed; the source will redeliver its messages",
                            exc_info=True, extra={"pipeline": self._pipeline})
            await self.unwritten(batch)

    async def _send(self, messages: Sequence[Message]) -> None:
        tracer = self.tracer
        if tracer is None:
            await self._shutdown.write(self.sink, messages)
            return
        span = tracer.begin(self._pipeline, self.name, messages)
        try:
            await self._shutdown.write(self.sink, messages)
        except BaseException as exc:
            tracer.end(span, exc)
            raise
        tracer.end(span, None)

    async def _written(self, batch: SinkBatch, indices: Sequence[int] | range) -> None:
        if len(indices) == len(batch) and batch.claim_all():  # the common case
            self._metrics.messages_out.inc(len(batch))
            self._metrics.bytes_out.inc(batch.nbytes)
            self.sink_metrics.messages_out.inc(len(batch))
            settle = self._settle
            for tracker, start, end in batch.spans:
                if tracker.done(end - start):
                    await settle(tracker)
            return
        fresh = batch.claim(indices)
        if not fresh:
            return
        self._metrics.messages_out.inc(len(fresh))
        self._metrics.bytes_out.inc(sum(len(batch.messages[i].data) for i in fresh))
        self.sink_metrics.messages_out.inc(len(fresh))
        await self.resolve(batch, fresh)

    async def resolve(self, batch: SinkBatch, claimed: Sequence[int]) -> None:
        """Count claimed indices against their source batches; settle finished ones."""
        for i in claimed:
            tracker = batch.owner(i)
            if tracker.done(1):
                await self._settle(tracker)

    async def unwritten(self, batch: SinkBatch) -> None:
        """Give up on every message of ``batch`` not resolved yet: the source redelivers."""
        fresh = batch.claim(range(len(batch)))
        for i in fresh:
            batch.owner(i).fail(None)
        await self.resolve(batch, fresh)

    # ---------------------------------------------------------- drain & abort

    def start_queued(self) -> None:
        """During a drain: start queued batches while slots are free."""
        while self._queue and self._busy < self.max_in_flight:
            self._start(self._dequeue())

    def has_work(self) -> bool:
        return bool(self._queue or self.tasks)

    def park_partial(self) -> None:
        """Move the partial batch into the queue (the drain writes it)."""
        partial = self.batcher.flush()
        if partial is not None:
            self._queue.append(partial)
            self.sink_metrics.queued.inc(len(partial))

    async def give_back_queued(self) -> None:
        """The deadline passed or the pipeline failed: queued batches go back."""
        while self._queue:
            await self.unwritten(self._dequeue())


async def reject(dead_letter: DeadLetter, rejected: list[Rejected], tracker: Tracker,
                 resolve: Callable[[SinkBatch, Sequence[int]], Awaitable[None]]) -> None:
    """Dead-letter poison that a transform or the router found."""
    batch = SinkBatch()
    batch.add([r.message for r in rejected], tracker, 0)
    errors: list[tuple[int, Exception]] = [
        (i, RejectedError(r.reason)) for i, r in enumerate(rejected)
    ]
    try:
        await dead_letter.send(batch, errors, 0, "rejected", resolve)
    except (Stopped, asyncio.CancelledError):
        fresh = batch.claim(range(len(batch)))
        for _ in fresh:
            tracker.fail(None)
        await resolve(batch, fresh)
        raise

