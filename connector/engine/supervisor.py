"""Runs every pipeline of a file; restarts a failed one with backoff, alone.

The supervisor owns the process-level view: which pipelines are ready, the
graceful stop with its deadline, the summary printed at exit, and the control
verbs of the admin API: pause, resume, restart, and applying a reload
(reload.py decides what changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from ..config.loader import LoadedFile, PipelineConfig
from .backoff import Backoff
from .pipeline import ConnectFailed, Pipeline, PipelineState

log = logging.getLogger("natsconn.supervisor")

READY_STATES = ("running", "paused", "finished")


@dataclass(slots=True)
class PipelineRecord:
    config: PipelineConfig
    current: Pipeline | None = None
    restarts: int = 0  # after a failure
    reloads: int = 0  # asked for: a changed config or POST .../restart
    last_error: str | None = None
    last_error_at: float | None = None  # wall clock
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    paused: bool = False
    removed: bool = False
    restart_asked: bool = False
    task: asyncio.Task[None] | None = None

    def fail(self, error: str) -> None:
        self.last_error = error
        self.last_error_at = time.time()


class Supervisor:
    def __init__(self, loaded: LoadedFile, instance: str = "natsconn") -> None:
        self.loaded = loaded
        self.instance = instance
        self.records = {p.spec.name: PipelineRecord(p) for p in loaded.pipelines}
        self._stopping = asyncio.Event()
        self._deadline: float | None = None
        self._changed: asyncio.Event | None = None
        self._leaving: set[asyncio.Task[None]] = set()  # removed pipelines still draining

    @property
    def deadline(self) -> float | None:
        """When a graceful stop must be over (monotonic), once one was asked for."""
        return self._deadline

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- state for /readyz and the summary -------------------------------------

    def ready(self) -> tuple[bool, dict[str, str]]:
        states = {}
        for name, rec in self.records.items():
            pipe = rec.current
            states[name] = pipe.state.value if pipe is not None else "starting"
        ok = all(s in READY_STATES for s in states.values())
        return ok, states

    # -- running ---------------------------------------------------------------

    async def run(self) -> None:
        """Run until every pipeline has finished or ``stop`` was called."""
        self._changed = asyncio.Event()
        for name, rec in self.records.items():
            self._start(name, rec)
        while True:
            tasks = {r.task for r in self.records.values() if r.task is not None}
            tasks |= set(self._leaving)
            live = {t for t in tasks if not t.done()}
            if not live:
                break
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({*live, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            for task in [t for t in live if t.done()]:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        self._leaving.clear()

    def _start(self, name: str, rec: PipelineRecord) -> None:
        rec.task = asyncio.create_task(self._keep(rec), name=f"pipeline:{name}")
        if self._changed is not None:
            self._changed.set()

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: stop reading, finish in-flight work within ``timeout``."""
        if self._stopping.is_set():
            return
        timeout = self.loaded.spec.shutdown_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        for rec in self.records.values():
            if rec.current is not None:
                rec.current.stop(self._deadline)

    # -- control verbs (the admin API) -------------------------------------------

    def pause(self, name: str) -> None:
        rec = self.records[name]
        rec.paused = True
        if rec.current is not None:
            rec.current.pause()

    def resume(self, name: str) -> None:
        rec = self.records[name]
        rec.paused = False
        if rec.current is not None:
            rec.current.resume()

    def restart(self, name: str, config: PipelineConfig | None = None) -> None:
        """Drain the running pipeline (within the shutdown timeout) and start it
        again at once, with ``config`` when given."""
        rec = self.records[name]
        if config is not None:
            rec.config = config
        rec.restart_asked = True
        if rec.current is not None:
            rec.current.stop(time.monotonic() + self.loaded.spec.shutdown_timeout)

    def remove(self, name: str) -> None:
        """Drain and stop a pipeline for good; it leaves the records once stopped."""
        rec = self.records.pop(name)
        rec.removed = True
        if rec.task is not None:
            self._leaving.add(rec.task)
        if rec.current is not None:
            rec.current.stop(time.monotonic() + self.loaded.spec.shutdown_timeout)

    def add(self, config: PipelineConfig) -> None:
        name = config.spec.name
        rec = PipelineRecord(config)
        self.records[name] = rec
        if self._changed is not None and not self._stopping.is_set():
            self._start(name, rec)

    # -- one pipeline's life -------------------------------------------------------

    async def _keep(self, rec: PipelineRecord) -> None:
        spec = self.loaded.spec
        backoff = Backoff(spec.restart_backoff, spec.restart_backoff_max)
        while not self._stopping.is_set() and not rec.removed:
            name = rec.config.spec.name
            pipe = Pipeline(rec.config, self.instance)
            rec.current = pipe
            if rec.paused:
                pipe.pause()
            if self._stopping.is_set() and self._deadline is not None:
                pipe.stop(self._deadline)
                break
            started = time.monotonic()
            try:
                await pipe.run()
            except ConnectFailed as exc:
                rec.fail(str(exc))
                log.error("%s", exc, extra={"pipeline": name})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                rec.fail(f"{type(exc).__name__}: {exc}")
                log.error("pipeline %r failed: %s", name, rec.last_error,
                          exc_info=True, extra={"pipeline": name})
            else:
                if rec.restart_asked and not rec.removed and not self._stopping.is_set():
                    rec.restart_asked = False
                    rec.reloads += 1
                    log.info("pipeline %r restarts (asked for)", name, extra={"pipeline": name})
                    continue
                if pipe.state is PipelineState.FINISHED:
                    log.info("pipeline %r finished: its source has no more input", name)
                rec.ended = time.monotonic()
                return
            if rec.restart_asked:  # a restart was asked for anyway: no backoff
                rec.restart_asked = False
                rec.reloads += 1
                continue
            if time.monotonic() - started > 60:
                backoff.reset()  # it ran for a while: start over with short waits
            rec.restarts += 1
            pipe.metrics.restarts.inc()
            wait = backoff.next()
            log.warning("pipeline %r restarts in %.1fs (restart %d)", name, wait, rec.restarts,
                        extra={"pipeline": name})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_for_stop_or_restart(rec), wait)
        rec.ended = time.monotonic()

    async def _wait_for_stop_or_restart(self, rec: PipelineRecord) -> None:
        """The backoff before a restart ends early on a stop, a restart asked for
        or a removal (polled: a restart is rare, and this keeps no extra events)."""
        while not (self._stopping.is_set() or rec.restart_asked or rec.removed):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
