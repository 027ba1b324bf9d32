"""One pipeline: read → transform → route → per-sink re-batch and writes → ack.

The reader loop reads only when the in-flight window has room, so a slow sink
stops the reads. Each sink is a lane (lane.py) with its own batcher, write
slots, retries and dead letter; the router (routing.py) picks the lanes of
each message. A source batch is settled once each of its messages is written
or dead-lettered by every sink it was routed to.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

from .._batch import Batch
from .._context import PluginContext
from .._errors import EndOfInput, RetryableError
from .._message import Message
from .._plugin import Rejected, Sink, Source, Transform
from ..config.loader import PipelineConfig, ResolvedPlugin
from ..ops import tracing
from ..ops.metrics import PipelineMetrics, PluginMeters
from .backoff import Backoff
from .chain import TransformChain
from .deadletter import DeadLetter
from .lane import SinkLane, reject
from .routing import Router
from .shutdown import Shutdown, Stopped
from .tracker import Tracker
from .window import Window

__all__ = ["ConnectFailed", "Pipeline", "PipelineState"]


class PipelineState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    DRAINING = "draining"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


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
        self._shutdown = Shutdown()
        self._resumed = asyncio.Event()
        self._resumed.set()
        # Room for every sink's full set of batches: its slots and one filling.
        bound = max(r.batch.max_messages * (r.max_in_flight + 1) for r in config.routes)
        self._window = Window(max(bound, spec.batch.max_messages * (spec.max_in_flight + 1)),
                              spec.max_in_flight_bytes)
        self.metrics.in_flight_max.set(self._window.max_messages)
        self.metrics.in_flight_max_bytes.set(self._window.max_bytes)
        self._live: set[Tracker] = set()
        self._side: set[asyncio.Task[None]] = set()  # dead-lettering of transform rejects
        self.source: Source[Any] = _instantiate(config.source, self.name, "source", instance)
        self.chain = TransformChain([
            _instantiate(t, self.name, "transform", instance) for t in config.transforms
        ])
        self.dead_letter: Sink[Any] | None = (
            _instantiate(config.dead_letter, self.name, "dead_letter", instance)
            if config.dead_letter is not None
            else None
        )
        self._dlq = DeadLetter(self.dead_letter, self.name, spec.retry, self._shutdown,
                               self.metrics, self.log)
        self._tracer = tracing.tracer()
        self.lanes = [self._lane(r) for r in config.routes]
        self._router = Router([lane.when for lane in self.lanes], spec.route, spec.unmatched)
        self._lane_chains = any(lane.chain for lane in self.lanes)

    def _lane(self, route: Any) -> SinkLane:
        name, instance = self.name, self._instance
        role = "sink" if len(self.config.routes) == 1 else f"sink:{route.name}"
        sink = _instantiate(route.sink, name, role, instance)
        dlq = self._dlq
        if route.dead_letter is not None:
            target = _instantiate(route.dead_letter, name, f"dead_letter:{route.name}", instance)
            dlq = DeadLetter(target, name, route.retry, self._shutdown, self.metrics, self.log)
        chain = TransformChain([_instantiate(t, name, "transform", instance)
                                for t in route.transforms])
        return SinkLane(route.name, sink, when=route.when, chain=chain, batch=route.batch,
                        max_in_flight=route.max_in_flight, retry=route.retry, dead_letter=dlq,
                        pipeline=name, metrics=self.metrics, shutdown=self._shutdown,
                        settle=self._settle, log=self.log, tracer=self._tracer,
                        distinct_letters=len(self.config.routes) > 1)

    @property
    def sink(self) -> Sink[Any]:
        """The first sink (with ``sink:``, the only one)."""
        return self.lanes[0].sink  # type: ignore[no-any-return]

    @property
    def transforms(self) -> list[Transform[Any]]:
        return self.chain.transforms

    # ------------------------------------------------------------------ control

    def stop(self, deadline: float) -> None:
        """Stop reading; in-flight work may finish until ``deadline`` (monotonic)."""
        self._shutdown.stop(deadline)

    def pause(self) -> None:
        """Stop reading; what was read is still written and acknowledged. The
        source keeps what it holds (JetStream keeps its prefetch alive)."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    @property
    def window(self) -> Window:
        """The in-flight bound: messages and bytes read but not yet acknowledged."""
        return self._window

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
            if not await self._shutdown.wait_or_stop(self._connect()):
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

    def _plugins(self) -> list[tuple[str, Any]]:
        """Everything to connect, in order: sinks, dead letters, transforms, source last
        (nothing is read before every way out is up)."""
        out: list[tuple[str, Any]] = []
        for lane in self.lanes:
            role = "sink" if len(self.lanes) == 1 else f"sink {lane.name!r}"
            out.append((role, lane.sink))
            if lane.dead_letter.target is not None and lane.dead_letter.target is not \
                    self.dead_letter:
                out.append((f"dead_letter of sink {lane.name!r}", lane.dead_letter.target))
        if self.dead_letter is not None:
            out.append(("dead_letter", self.dead_letter))
        for t in self.chain.transforms:
            out.append(("transform", t))
        for lane in self.lanes:
            for t in lane.chain.transforms:
                out.append((f"transform of sink {lane.name!r}", t))
        out.append(("source", self.source))
        return out

    async def _connect(self) -> None:
        for role, plugin in self._plugins():
            try:
                await plugin.connect()
            except Exception as exc:
                raise ConnectFailed(self.name, role, plugin, exc) from exc

    async def _close(self) -> None:
        plugins = self._plugins()
        for _role, plugin in [plugins[-1], *plugins[:-1]]:  # the source first
            try:
                await plugin.close()
            except Exception:
                self.log.warning("error while closing %s", type(plugin).__name__, exc_info=True)

    # ------------------------------------------------------------------ reading

    async def _pump(self) -> bool:
        """The reader loop. Returns True when the source ended, False when stopped."""
        source, window, policy, lanes = self.source, self._window, self._policy, self.lanes
        shutdown = self._shutdown
        stopping = shutdown.stopping
        read_backoff = Backoff(self._retry.initial_backoff, self._retry.max_backoff)
        single = lanes[0] if len(lanes) == 1 else None
        resumed = self._resumed
        while not stopping.is_set():
            if not resumed.is_set():
                for lane in lanes:  # what was read goes out now, not after the pause
                    lane.flush()
                self.state = PipelineState.PAUSED
                self.log.info("pipeline paused", extra={"pipeline": self.name})
                if not await shutdown.wait_or_stop(resumed.wait()):
                    break
                self.state = PipelineState.RUNNING
                self.log.info("pipeline resumed", extra={"pipeline": self.name})
                continue
            if window.room() == 0:
                # Nothing more can join a partial batch until room frees, and room
                # may only free by writing it (a filtering transform, or a byte
                # window smaller than a batch): send partial batches on now.
                for lane in lanes:
                    lane.flush()
                if not await shutdown.wait_or_stop(window.wait_room()):
                    break
                continue
            left = single.time_left() if single is not None else self._time_left()
            max_wait = policy.max_wait if left is None else left
            try:
                batch = await source.read_batch(min(policy.max_messages, window.room()), max_wait)
            except EndOfInput:
                return True
            except RetryableError as exc:
                wait = read_backoff.next(exc.retry_after)
                self.log.warning("source read failed, retrying in %.2fs: %s", wait, exc,
                                 extra={"pipeline": self.name})
                await shutdown.sleep_or_stop(wait)
                continue
            read_backoff.reset()
            if batch is not None and batch.messages:
                await self._accept(batch)
            elif batch is not None:
                await batch.ack.ack()
            for lane in lanes:
                if lane.time_left() == 0.0:
                    lane.flush()
        return False

    def _time_left(self) -> float | None:
        lefts = [t for t in (lane.time_left() for lane in self.lanes) if t is not None]
        return min(lefts) if lefts else None

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
        if self.chain:
            messages, rejected = await self.chain.apply(messages)
        per_lane, unmatched, failed = self._router.route(messages)
        if failed:
            rejected += failed
        if unmatched:
            self.metrics.unrouted.inc(len(unmatched))
        work: list[tuple[SinkLane, list[Message], list[Rejected]]] = []
        total = len(rejected)
        for lane, routed in zip(self.lanes, per_lane, strict=True):
            if not routed:
                continue
            bad: list[Rejected] = []
            if self._lane_chains and lane.chain:
                routed, bad = await lane.chain.apply(routed)
            total += len(routed) + len(bad)
            work.append((lane, routed, bad))
        # Counted in full before any write can resolve a message of this batch.
        tracker.remaining = total
        if total == 0:  # everything dropped by transforms or routing
            await self._settle(tracker)
            return
        if rejected:
            # Poison found by a transform or the router: dead-letter it beside the flow.
            self._spawn(reject(self._dlq, rejected, tracker, self.lanes[0].resolve))
        for lane, routed, bad in work:
            if bad:
                lane.reject(bad, tracker)
            if routed:
                # The source batch unchanged (no transform, no routing): its bytes
                # are counted already.
                lane.add(routed, tracker, nbytes if routed is batch.messages else None)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._side.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._side.discard(t)
            if not t.cancelled() and not isinstance(t.exception(), Stopped | None):
                self.log.error("dead-letter task failed", exc_info=t.exception())

        task.add_done_callback(finished)

    # ---------------------------------------------------------------- settling

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

    # ---------------------------------------------------------- drain & abort

    def _tasks(self) -> set[asyncio.Task[None]]:
        tasks = set(self._side)
        for lane in self.lanes:
            tasks |= lane.tasks
        return tasks

    async def _drain(self) -> None:
        """Write what was read, within the deadline; give back what cannot be written."""
        for lane in self.lanes:
            lane.park_partial()
            lane.start_queued()
        while True:
            tasks = self._tasks()
            if not tasks:
                break
            some = asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if await self._shutdown.before_deadline(some):
                for lane in self.lanes:
                    lane.start_queued()
                continue
            pending = self._tasks()
            self.log.warning("shutdown timeout: %d write(s) abandoned; their messages will be "
                             "redelivered by the source", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            break
        for lane in self.lanes:
            await lane.give_back_queued()
        for tracker in list(self._live):  # none expected; never leave one unsettled
            tracker.fail(None)
            await self._settle(tracker)

    async def _abandon(self) -> None:
        """After a failure: cancel writes; unwritten messages are nacked."""
        for lane in self.lanes:
            lane.park_partial()
            await lane.give_back_queued()
        tasks = self._tasks()
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
