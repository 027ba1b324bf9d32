"""Runs every pipeline of a file; restarts a failed one with backoff, alone.

The supervisor owns the process-level view: which pipelines are ready, the
graceful stop with its deadline, and the summary printed at exit.
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


@dataclass(slots=True)
class PipelineRecord:
    config: PipelineConfig
    current: Pipeline | None = None
    restarts: int = 0
    last_error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class Supervisor:
    def __init__(self, loaded: LoadedFile, instance: str = "natsconn") -> None:
        self.loaded = loaded
        self.instance = instance
        self.records = {p.spec.name: PipelineRecord(p) for p in loaded.pipelines}
        self._stopping = asyncio.Event()
        self._deadline: float | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def deadline(self) -> float | None:
        """When a graceful stop must be over (monotonic), once one was asked for."""
        return self._deadline

    # -- state for /readyz and the summary -------------------------------------

    def ready(self) -> tuple[bool, dict[str, str]]:
        states = {}
        for name, rec in self.records.items():
            pipe = rec.current
            states[name] = pipe.state.value if pipe is not None else "starting"
        ok = all(s in ("running", "finished") for s in states.values())
        return ok, states

    # -- running ---------------------------------------------------------------

    async def run(self) -> None:
        """Run until every pipeline has finished or ``stop`` was called."""
        self._tasks = [asyncio.create_task(self._keep(rec), name=f"pipeline:{name}")
                       for name, rec in self.records.items()]
        await asyncio.gather(*self._tasks)

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

    async def _keep(self, rec: PipelineRecord) -> None:
        spec = self.loaded.spec
        backoff = Backoff(spec.restart_backoff, spec.restart_backoff_max)
        name = rec.config.spec.name
        while not self._stopping.is_set():
            pipe = Pipeline(rec.config, self.instance)
            rec.current = pipe
            if self._stopping.is_set() and self._deadline is not None:
                pipe.stop(self._deadline)
                break
            started = time.monotonic()
            try:
                await pipe.run()
            except ConnectFailed as exc:
                rec.last_error = str(exc)
                log.error("%s", exc, extra={"pipeline": name})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                rec.last_error = f"{type(exc).__name__}: {exc}"
                log.error("pipeline %r failed: %s", name, rec.last_error,
                          exc_info=True, extra={"pipeline": name})
            else:
                if pipe.state is PipelineState.FINISHED:
                    log.info("pipeline %r finished: its source has no more input", name)
                rec.ended = time.monotonic()
                return
            if time.monotonic() - started > 60:
                backoff.reset()  # it ran for a while: start over with short waits
            rec.restarts += 1
            pipe.metrics.restarts.inc()
            wait = backoff.next()
            log.warning("pipeline %r restarts in %.1fs (restart %d)", name, wait, rec.restarts,
                        extra={"pipeline": name})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
        rec.ended = time.monotonic()
