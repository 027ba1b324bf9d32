"""One pipeline: read → transform → re-batch → bounded concurrent writes → ack.

The reader loop reads only when the in-flight window has room and a write slot
is free, so a slow sink stops the reads. Writes run as one task per sink batch
(never per message); a source batch is settled once all its messages are
written or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from .._batch import Batch
from .._context import PluginContext
from .._errors import EndOfInput, PartialWriteError, RejectedError, RetryableError
from .._message import Message
from .._plugin import Rejected, Sink, Source, Transform
from ..config.loader import PipelineConfig, ResolvedPlugin
from ..ops.metrics import PipelineMetrics, PluginMeters
from .backoff import Backoff
from .batcher import Batcher, SinkBatch
from .tracker import Tracker
from .window import Window

# Headers added to dead-lettered messages (documented in docs/delivery.md).
H_ERROR = "Natsconn-Error"
H_ERROR_KIND = "Natsconn-Error-Kind"
H_ATTEMPTS = "Natsconn-Attempts"
H_PIPELINE = "Natsconn-Pipeline"
H_SUBJECT = "Natsconn-Original-Subject"
H_SOURCE_ID = "Natsconn-Source-Id"


class PipelineState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


class _Stopped(Exception):
    """A write was abandoned because the shutdown deadline passed."""


def _instantiate(plugin: ResolvedPlugin, pipeline: str, role: str, instance: str) -> Any:
    logger = logging.getLogger(f"natsconn.pipeline.{pipeline}.{role}")
    context = PluginContext(pipeline, role, instance, logger, PluginMeters(pipeline, role, logger))
    return plugin.cls(plugin.config, context)


class Pipeline:
    def __init__(self, config: PipelineConfig, instance: str = "natsconn") -> None:
        spec = config.spec
        self.config = config
        self.name = spec.name
        self.log = logging.getLogger(f"natsconn.pipeline.{self.name}")
        self.metrics = PipelineMetrics(self.name)
        self.state = PipelineState.STARTING
        self._instance = instance
        self._policy = spec.batch
        self._retry = spec.retry
        self._max_in_flight = spec.max_in_flight
        self._slots = asyncio.Semaphore(spec.max_in_flight)
        self._window = Window(spec.batch.max_messages * (spec.max_in_flight + 1),
                              spec.max_in_flight_bytes)
        self._batcher = Batcher(spec.batch.max_messages, spec.batch.max_bytes,
                                spec.batch.max_wait)
        self._writes: set[asyncio.Task[None]] = set()
        self._leftover: list[SinkBatch] = []
        self._live: set[Tracker] = set()
        self._stopping = asyncio.Event()
        self._deadline: float | None = None
        self.source: Source[Any] = _instantiate(config.source, self.name, "source", instance)
        self.transforms: list[Transform[Any]] = [
            _instantiate(t, self.name, "transform", instance) for t in config.transforms
        ]
        self.sink: Sink[Any] = _instantiate(config.sink, self.name, "sink", instance)
        self.dead_letter: Sink[Any] | None = (
            _instantiate(config.dead_letter, self.name, "dead_letter", instance)
            if config.dead_letter is not None
            else None
        )

    # ------------------------------------------------------------------ control

    def stop(self, deadline: float) -> None:
        """Stop reading; in-flight work may finish until ``deadline`` (monotonic)."""
        self._deadline = deadline
        self._stopping.set()

    @property
    def in_flight(self) -> int:
        return self._window.messages

    async def run(self) -> None:
        """Connect, pump until stopped or the source ends, drain, close.

        Raises on a failure that needs a restart; the supervisor handles that.
        """
        self.state = PipelineState.STARTING
        try:
            # A stop asked for while a plugin is still connecting ends the run at once.
            if not await self._wait_or_stop(self._connect()):
                self.state = PipelineState.STOPPED
                return
            self.state = PipelineState.RUNNING
            self.metrics.up.set(1)
            self.log.info("pipeline running", extra={"pipeline": self.name})
            # The ticker runs through the drain too: a long write finishing after a
            # stop must still extend the source's ack deadline.
            ticker = asyncio.create_task(self._progress_ticker())
            try:
                ended = await self._pump()
                self.state = PipelineState.DRAINING
                await self._drain()
            finally:
                ticker.cancel()
            self.state = PipelineState.FINISHED if ended else PipelineState.STOPPED
        except BaseException:
            self.state = PipelineState.FAILED
            await self._abandon()
            raise
        finally:
            self.metrics.up.set(0)
            await self._close()

    async def _connect(self) -> None:
        plugins: list[tuple[str, Source[Any] | Sink[Any]]] = [("sink", self.sink)]
        if self.dead_letter is not None:
            plugins.append(("dead_letter", self.dead_letter))
        plugins.append(("source", self.source))  # last: nothing is read before sinks are up
        for role, plugin in plugins:
            try:
                await plugin.connect()
            except Exception as exc:
                raise ConnectFailed(self.name, role, plugin, exc) from exc

    async def _close(self) -> None:
        for plugin in (self.source, self.sink, self.dead_letter):
            if plugin is None:
                continue
            try:
                await plugin.close()
            except Exception:
                self.log.warning("error while closing %s", type(plugin).__name__, exc_info=True)

    # ------------------------------------------------------------------ reading

    async def _pump(self) -> bool:
        """The reader loop. Returns True when the source ended, False when stopped."""
        source, window, batcher, policy = self.source, self._window, self._batcher, self._policy
        stopping = self._stopping
        read_backoff = Backoff(self._retry.initial_backoff, self._retry.max_backoff)
        while not stopping.is_set():
            if window.room() == 0:
                # Nothing more can join a partial batch until room frees, and room
                # may only free by writing it (a filtering transform, or a byte
                # window smaller than a batch): write it now rather than deadlock.
                partial = batcher.flush()
                if partial is not None:
                    await self._dispatch(partial)
                    continue
                if not await self._wait_or_stop(window.wait_room()):
                    break
                continue
            left = batcher.time_left()
            max_wait = policy.max_wait if left is None else left
            try:
                batch = await source.read_batch(min(policy.max_messages, window.room()), max_wait)
            except EndOfInput:
                return True
            except RetryableError as exc:
                wait = read_backoff.next(exc.retry_after)
                self.log.warning("source read failed, retrying in %.2fs: %s", wait, exc,
                                 extra={"pipeline": self.name})
                await self._sleep_or_stop(wait)
                continue
            read_backoff.reset()
            if batch is not None and batch.messages:
                await self._accept(batch)
            elif batch is not None:
                await batch.ack.ack()
            if batcher.time_left() == 0.0:
                partial = batcher.flush()
                if partial is not None:
                    await self._dispatch(partial)
        return False

    async def _accept(self, batch: Batch) -> None:
        messages = batch.messages
        count = len(messages)
        nbytes = sum(len(m.data) for m in messages)
        self._window.take(count, nbytes)
        self.metrics.messages_in.inc(count)
        self.metrics.bytes_in.inc(nbytes)
        self._gauge()
        tracker = Tracker(batch.ack, count, nbytes)
        self._live.add(tracker)
        rejected: list[Rejected] = []
        if self.transforms:
            messages, rejected = self._transform(messages)
        tracker.remaining = len(messages) + len(rejected)
        if tracker.remaining == 0:  # everything dropped by transforms
            await self._settle(tracker)
            return
        if rejected:
            # Poison found by a transform: dead-letter it beside the normal flow.
            self._spawn(self._reject(rejected, tracker))
        if messages:
            for full in self._batcher.add(messages, tracker):
                await self._dispatch(full)

    def _transform(self, messages: list[Message]) -> tuple[list[Message], list[Rejected]]:
        rejected: list[Rejected] = []
        for transform in self.transforms:
            out = transform.process(messages)
            messages = []
            for item in out:
                if isinstance(item, Message):
                    messages.append(item)
                else:
                    rejected.append(item)
        return messages, rejected

    # ------------------------------------------------------------------ writing

    async def _dispatch(self, batch: SinkBatch) -> None:
        """Start a write when a slot is free; when told to stop first, keep the
        batch for the drain, which writes it before the deadline or nacks it."""
        if not self._slots.locked() and not self._stopping.is_set():
            await self._slots.acquire()  # free slot: no waiting, no extra futures
            self._spawn(self._write(batch), holds_slot=True)
        elif await self._wait_or_stop(self._slots.acquire()):
            self._spawn(self._write(batch), holds_slot=True)
        else:
            self._leftover.append(batch)

    def _spawn(self, coro: object, holds_slot: bool = False) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._writes.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._writes.discard(t)
            if holds_slot:
                self._slots.release()
            if not t.cancelled() and not isinstance(t.exception(), _Stopped | None):
                self.log.error("write task failed", exc_info=t.exception())

        task.add_done_callback(finished)

    async def _write(self, batch: SinkBatch) -> None:
        """Write with retries; dead-letter what cannot be written; settle trackers."""
        pending: list[int] | None = None  # None: the whole batch
        backoff = Backoff(self._retry.initial_backoff, self._retry.max_backoff,
                          self._retry.multiplier)
        attempt = 0
        max_attempts = self._retry.max_attempts
        try:
            while True:
                attempt += 1
                messages = batch.messages if pending is None else [
                    batch.messages[i] for i in pending
                ]
                started = time.perf_counter()
                try:
                    await self._sink_write(messages)
                except PartialWriteError as exc:
                    index = range(len(batch)) if pending is None else pending
                    failed = exc.failed
                    written = [index[i] for i in range(len(messages)) if i not in failed]
                    await self._written(batch, written)
                    poison = [(index[i], e) for i, e in failed.items()
                              if isinstance(e, RejectedError)]
                    if poison:
                        await self._dead_letter(batch, poison, attempt, "rejected")
                    retry = [(index[i], e) for i, e in failed.items()
                             if not isinstance(e, RejectedError)]
                    if not retry:
                        return
                    pending = [i for i, _ in retry]
                    error: Exception = retry[0][1]
                except RejectedError as exc:
                    index = range(len(batch)) if pending is None else pending
                    await self._dead_letter(batch, [(i, exc) for i in index], attempt, "rejected")
                    return
                except _Stopped:
                    raise
                except Exception as exc:
                    error = exc
                    if not isinstance(exc, RetryableError):
                        self.log.warning("sink raised %s, treating it as retryable",
                                         type(exc).__name__, exc_info=True)
                else:
                    self.metrics.write_seconds.observe(time.perf_counter() - started)
                    self.metrics.batches.inc()
                    await self._written(batch, range(len(batch)) if pending is None else pending)
                    return
                # A retryable failure of ``pending`` (or all).
                if max_attempts is not None and attempt >= max_attempts:
                    index = range(len(batch)) if pending is None else pending
                    await self._dead_letter(batch, [(i, error) for i in index], attempt,
                                            "exhausted")
                    return
                self.metrics.retries.inc()
                retry_after = error.retry_after if isinstance(error, RetryableError) else None
                wait = backoff.next(retry_after)
                self.log.warning("write of %d message(s) failed (attempt %d), retrying in "
                                 "%.2fs: %s", len(messages), attempt, wait, error,
                                 extra={"pipeline": self.name})
                await self._sleep_or_deadline(wait)
        except (_Stopped, asyncio.CancelledError):
            # Shutdown deadline: whatever is unwritten comes again from the source.
            await self._unwritten(batch)
            raise
        except Exception:
            # A bug (a PartialWriteError naming an index the batch lacks, a failing
            # dead-letter header...): give the batch back to the source rather than
            # leave it unsettled, which would hold the window and stall the reads.
            self.log.error("write task failed; the source will redeliver its messages",
                           exc_info=True, extra={"pipeline": self.name})
            await self._unwritten(batch)

    async def _sink_write(self, messages: Sequence[Message]) -> None:
        await self._before_deadline(self.sink, messages)

    async def _before_deadline(self, sink: Sink, messages: Sequence[Message]) -> None:  # type: ignore[type-arg]
        """``sink.write_batch``, abandoned with :class:`_Stopped` at the shutdown deadline.

        A TimeoutError the sink raises itself (a publish ack that timed out) is a
        failure to retry, not the deadline: only the clock tells them apart.
        """
        if self._deadline is None:
            await sink.write_batch(messages)
            return
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _Stopped
        try:
            await asyncio.wait_for(sink.write_batch(messages), left)
        except TimeoutError:
            if time.monotonic() >= self._deadline:
                raise _Stopped from None
            raise

    async def _written(self, batch: SinkBatch, indices: Sequence[int] | range) -> None:
        if len(indices) == len(batch) and batch.claim_all():  # the common case
            self.metrics.messages_out.inc(len(batch))
            self.metrics.bytes_out.inc(batch.nbytes)
            for tracker, start, end in batch.spans:
                if tracker.done(end - start):
                    await self._settle(tracker)
            return
        fresh = batch.claim(indices)
        if not fresh:
            return
        self.metrics.messages_out.inc(len(fresh))
        self.metrics.bytes_out.inc(sum(len(batch.messages[i].data) for i in fresh))
        await self._resolve(batch, fresh)

    async def _resolve(self, batch: SinkBatch, claimed: Sequence[int]) -> None:
        """Count claimed indices against their source batches; settle finished ones."""
        for i in claimed:
            tracker = batch.owner(i)
            if tracker.done(1):
                await self._settle(tracker)

    async def _unwritten(self, batch: SinkBatch) -> None:
        """Give up on every message of ``batch`` not resolved yet: the source redelivers."""
        fresh = batch.claim(range(len(batch)))
        for i in fresh:
            batch.owner(i).fail(None)
        await self._resolve(batch, fresh)

    async def _settle(self, tracker: Tracker) -> None:
        self._live.discard(tracker)
        try:
            outcome = await tracker.settle()
            self.metrics.acks[outcome].inc()
        except Exception:
            # The source redelivers what it could not hear acknowledged.
            self.log.warning("acknowledging a source batch failed", exc_info=True)
        finally:
            self._window.release(tracker.read_count, tracker.nbytes)
            self._gauge()

    def _gauge(self) -> None:
        self.metrics.in_flight.set(self._window.messages)
        self.metrics.in_flight_bytes.set(self._window.bytes)

    # ------------------------------------------------------------ dead letters

    async def _reject(self, rejected: list[Rejected], tracker: Tracker) -> None:
        batch = SinkBatch()
        batch.add([r.message for r in rejected], tracker, 0)
        errors = [(i, RejectedError(r.reason)) for i, r in enumerate(rejected)]
        try:
            await self._dead_letter(batch, errors, 0, "rejected")
        except (_Stopped, asyncio.CancelledError):
            await self._unwritten(batch)
            raise

    async def _dead_letter(self, batch: SinkBatch, failed: Sequence[tuple[int, Exception]],
                           attempts: int, kind: str) -> None:
        if self.dead_letter is None:
            for i, error in failed:
                message = batch.messages[i]
                self.log.error(
                    "message rejected and no dead_letter is configured; terminating it at the "
                    "source: %s", error,
                    extra={"pipeline": self.name, "source_id": message.id,
                           "subject": message.subject},
                )
                batch.owner(i).terminate(f"{kind}: {error}")
            self.metrics.rejected_unrouted.inc(len(failed))
            await self._resolve(batch, batch.claim([i for i, _ in failed]))
            return
        letters = []
        for i, error in failed:
            m = batch.messages[i]
            headers = dict(m.headers)
            headers[H_ERROR] = _header_safe(str(error) or type(error).__name__)
            headers[H_ERROR_KIND] = kind
            headers[H_ATTEMPTS] = str(attempts)
            headers[H_PIPELINE] = self.name
            if m.subject is not None:
                headers[H_SUBJECT] = m.subject
            if m.id is not None:
                headers[H_SOURCE_ID] = m.id
            letters.append(Message(m.data, m.subject, m.key, headers, m.timestamp, m.id))
        backoff = Backoff(self._retry.initial_backoff, self._retry.max_backoff,
                          self._retry.multiplier)
        todo = list(range(len(letters)))  # positions in ``letters`` / ``failed``
        refused: list[tuple[int, Exception]] = []
        while todo:
            retry: list[int] = []
            try:
                await self._before_deadline(self.dead_letter, [letters[j] for j in todo])
            except _Stopped:
                raise
            except PartialWriteError as exc:
                known = {k: e for k, e in exc.failed.items() if 0 <= k < len(todo)}
                refused += [(todo[k], e) for k, e in known.items()
                            if isinstance(e, RejectedError)]
                retry = [todo[k] for k, e in known.items() if not isinstance(e, RejectedError)]
                last: Exception = exc
            except RejectedError as exc:
                refused += [(j, exc) for j in todo]
            except Exception as exc:
                retry, last = todo, exc
            todo = retry
            if todo:
                wait = backoff.next(getattr(last, "retry_after", None))
                self.log.error("dead-letter write failed, retrying in %.2fs: %s", wait, last,
                               extra={"pipeline": self.name})
                await self._sleep_or_deadline(wait)
        for j, why in refused:
            # The last resort refuses it too (too large for it as well, say): a retry
            # cannot help and would hold the batch for ever. Terminate it at the source.
            i, error = failed[j]
            self.log.error("the dead_letter target refused a message; terminating it at the "
                           "source: %s", why, extra={"pipeline": self.name,
                                                     "source_id": batch.messages[i].id})
            batch.owner(i).terminate(f"{kind}: {error}; the dead_letter target refused it: "
                                     f"{why}")
        self.metrics.rejected_unrouted.inc(len(refused))
        written = len(letters) - len(refused)
        if written:
            self.metrics.dead_lettered.inc(written)
            self.log.warning("%d message(s) dead-lettered (%s): %s", written, kind,
                             failed[0][1], extra={"pipeline": self.name})
        await self._resolve(batch, batch.claim([i for i, _ in failed]))

    # ---------------------------------------------------------- drain & abort

    async def _drain(self) -> None:
        """Write what was read, within the deadline; nack what cannot be written."""
        partial = self._batcher.flush()
        if partial is not None:
            self._leftover.append(partial)
        while self._leftover:
            batch = self._leftover.pop(0)
            if not await self._before_stop_deadline(self._slots.acquire()):
                await self._unwritten(batch)
                continue
            self._spawn(self._write(batch), holds_slot=True)
        while self._writes:
            some = asyncio.wait(set(self._writes), return_when=asyncio.FIRST_COMPLETED)
            if await self._before_stop_deadline(some):
                continue
            pending = set(self._writes)
            self.log.warning("shutdown timeout: %d write(s) abandoned; their messages will be "
                             "redelivered by the source", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            break
        for tracker in list(self._live):  # none expected; never leave one unsettled
            tracker.fail(None)
            await self._settle(tracker)

    async def _abandon(self) -> None:
        """After a failure: cancel writes; unwritten messages are nacked."""
        partial = self._batcher.flush()
        if partial is not None:
            self._leftover.append(partial)
        for batch in self._leftover:
            await self._unwritten(batch)
        self._leftover.clear()
        tasks = set(self._writes)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Source batches that never reached a write (a transform raised): redeliver.
        for tracker in list(self._live):
            tracker.fail(None)
            await self._settle(tracker)

    async def _progress_ticker(self) -> None:
        """Extend the source's ack deadline for every unsettled batch (JetStream)."""
        interval = self.config.spec.in_progress_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            for tracker in list(self._live):
                try:
                    await tracker.ack.in_progress()
                except Exception:
                    self.log.debug("in-progress signal failed", exc_info=True)

    # ---------------------------------------------------------------- waiting

    async def _wait_or_stop(self, aw: Awaitable[object]) -> bool:
        """Await ``aw``; False (and ``aw`` cancelled) if told to stop first."""
        if self._stopping.is_set():
            if inspect.iscoroutine(aw):
                aw.close()  # never started: close it so it is not reported as leaked
            return False
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return await _outcome(task)

    async def _before_stop_deadline(self, aw: Awaitable[object]) -> bool:
        """Await ``aw``; False (``aw`` cancelled) once the shutdown deadline passes.

        With no stop requested yet there is no deadline (the source ended and the
        drain waits for the last writes): a stop arriving meanwhile brings one.
        """
        task = asyncio.ensure_future(aw)
        while not task.done():
            if self._deadline is None:
                stop = asyncio.ensure_future(self._stopping.wait())
                try:
                    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                continue
            left = self._deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait({task}, timeout=left)
        return await _outcome(task)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _sleep_or_deadline(self, seconds: float) -> None:
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= seconds:
                await asyncio.sleep(max(0.0, left))
                raise _Stopped
        await asyncio.sleep(seconds)


async def _outcome(task: asyncio.Future[object]) -> bool:
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


class ConnectFailed(Exception):
    """Connecting a plugin failed; carries which one, for a clear log line."""

    def __init__(self, pipeline: str, role: str, plugin: object, cause: BaseException) -> None:
        self.pipeline = pipeline
        self.role = role
        self.cause = cause
        super().__init__(
            f"pipeline {pipeline!r}: {role} {type(plugin).__name__} could not connect: "
            f"{type(cause).__name__}: {cause}"
        )


def _header_safe(text: str) -> str:
    """Header values are one line."""
    return " ".join(text.split())[:1000]
