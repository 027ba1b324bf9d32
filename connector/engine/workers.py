"""``natsconn run --workers N``: every core of a pod, with nothing coordinated by us.

The parent process runs no pipeline. It starts N worker processes, each
``natsconn run`` of the same file with its own connections; the servers split
the work between them exactly as they split it between pods (one JetStream
durable, a Kafka consumer group, a Redis consumer group, SKIP LOCKED claims, a
core NATS queue group). A pipeline whose source cannot be shared (a core NATS
subscription without a queue group, LISTEN/NOTIFY, Redis pub/sub, a CDC
replication slot, ``generate``) runs in worker 0 only.

The parent restarts a worker that dies, with backoff (the servers redeliver
what it held), forwards SIGTERM/SIGINT/SIGHUP, and serves the pod's one
listener: ``/metrics`` merged from the workers through prometheus-client's
multiprocess mode (counters summed, and never going backwards across a
restart), ``/readyz`` (ready when every worker is), and the admin API, whose
calls go to every worker and whose answers are merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.loader import LoadedFile
from .backoff import Backoff

log = logging.getLogger("natsconn.workers")

ENV_INDEX = "NATSCONN_WORKER_INDEX"
ENV_COUNT = "NATSCONN_WORKERS"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


# ------------------------------------------------------------------ how many


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU
    quota (a container's CPU limit), rounded up, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None if unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def resolve(value: int | str | None) -> int:
    """``auto`` → usable cores; a number → itself (1 when unset)."""
    if value is None:
        return 1
    if value == "auto":
        return usable_cores()
    return int(value)


# ------------------------------------------------------------ in a worker


def for_worker(loaded: LoadedFile, index: int, count: int) -> LoadedFile:
    """The pipelines worker ``index`` of ``count`` runs: every shareable one, and
    the others only in worker 0."""
    if count <= 1:
        return loaded
    kept = []
    for p in loaded.pipelines:
        cls = p.source.cls
        shareable = bool(getattr(cls, "shareable", lambda _c: False)(p.source.config))
        if shareable or index == 0:
            kept.append(p)
        elif index == 1:  # said once, not by every worker
            log.info("pipeline %r runs in worker 0 only: its source (%s) cannot be shared "
                     "between replicas", p.spec.name, p.source.name)
    return LoadedFile(loaded.file, loaded.spec, kept, loaded.secrets)


def not_shared(loaded: LoadedFile) -> list[str]:
    return [p.spec.name for p in loaded.pipelines
            if not getattr(p.source.cls, "shareable", lambda _c: False)(p.source.config)]


# ------------------------------------------------------------ the parent


@dataclass
class Worker:
    index: int
    port: int
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    finished: bool = False  # exited 0: its pipelines ended (or --until-idle)


class WorkerPool:
    def __init__(self, file: str, count: int, args: Sequence[str], shutdown_timeout: float,
                 restart_backoff: float = 1.0, restart_backoff_max: float = 30.0,
                 instance: str = "natsconn") -> None:
        self.file = file
        self.count = count
        self.args = list(args)  # passed to every worker's `natsconn run`
        self.shutdown_timeout = shutdown_timeout
        self.instance = instance
        self.workers = [Worker(i, _free_port()) for i in range(count)]
        self.stopping = False
        self.metrics_dir = tempfile.mkdtemp(prefix="natsconn-metrics-")
        self._backoff = (restart_backoff, restart_backoff_max)

    # -- running -----------------------------------------------------------------

    async def run(self) -> int:
        try:
            results = await asyncio.gather(*(self._keep(w) for w in self.workers))
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return max(results) if results else 0

    async def _spawn(self, w: Worker) -> asyncio.subprocess.Process:
        env = {**os.environ, MULTIPROC_ENV: self.metrics_dir, ENV_INDEX: str(w.index),
               ENV_COUNT: str(self.count), "NATSCONN_INSTANCE": f"{self.instance}-w{w.index}"}
        cmd = [sys.executable, "-m", "connector.cli", "run", self.file, *self.args,
               "--http-address", f"127.0.0.1:{w.port}", "--workers", "1"]
        w.starts += 1
        return await asyncio.create_subprocess_exec(*cmd, env=env,
                                                    stdin=asyncio.subprocess.DEVNULL)

    async def _keep(self, w: Worker) -> int:
        backoff = Backoff(*self._backoff)
        while True:
            started = time.monotonic()
            w.proc = await self._spawn(w)
            log.info("worker %d started (pid %d)", w.index, w.proc.pid)
            code = await w.proc.wait()
            w.exit_codes.append(code)
            self._mark_dead(w.proc.pid)
            if self.stopping or code == 0:
                w.finished = code == 0
                return 0 if code in (0, -signal.SIGTERM, 130) else code
            if time.monotonic() - started > 60:
                backoff.reset()
            wait = backoff.next()
            log.error("worker %d (pid %d) exited with %d; restarting in %.1fs; its "
                      "unacknowledged messages are redelivered by the servers", w.index,
                      w.proc.pid, code, wait)
            await asyncio.sleep(wait)
            if self.stopping:
                return 0

    def _mark_dead(self, pid: int) -> None:
        """Drop a dead worker's live gauges; its counters stay (and keep the sums)."""
        from prometheus_client import multiprocess

        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    # -- signals -----------------------------------------------------------------

    def send(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def stop(self) -> None:
        self.stopping = True
        self.send(signal.SIGTERM)

    def kill(self) -> None:
        self.stopping = True
        self.send(signal.SIGKILL)

    # -- what the pod's listener answers ------------------------------------------

    def metrics(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        answers = await asyncio.gather(*(self._ask(w, "GET", "/readyz") for w in self.workers))
        out: dict[str, Any] = {}
        ok = True
        for w, (status, body) in zip(self.workers, answers, strict=True):
            if w.finished:
                out[str(w.index)] = {"ready": True, "finished": True}
                continue
            ok = ok and status == 200
            out[str(w.index)] = body if isinstance(body, dict) else {"ready": False,
                                                                   "error": "not answering"}
        return ok, out

    async def forward(self, method: str, path: str, headers: dict[str, str]
                      ) -> tuple[int, bytes, str]:
        """An admin call, made to every worker; the answers merged."""
        keep = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
        answers = await asyncio.gather(*(self._ask(w, method, path, keep, raw=True)
                                         for w in self.workers if not w.finished))
        if not answers:
            return 503, b'{"detail": "no worker is running"}\n', "application/problem+json"
        for status, body in answers:
            if status >= 400 or status == 0:
                return (status or 503), body, "application/problem+json"
        first = json.loads(answers[0][1] or b"null")
        if method == "GET" and path == "/pipelines":
            docs = [json.loads(b) for _, b in answers]
            merged = {"pipelines": merge_pipelines([d["pipelines"] for d in docs]),
                      "workers": len(docs)}
            if "last_reload" in first:
                merged["last_reload"] = first["last_reload"]
            return 200, json.dumps(merged).encode() + b"\n", "application/json"
        if method == "GET" and path.startswith("/pipelines/"):
            docs = [json.loads(b) for _, b in answers]
            one = merge_pipelines([[d] for d in docs])[0]
            one["config"] = first.get("config")
            return 200, json.dumps(one).encode() + b"\n", "application/json"
        if isinstance(first, dict):
            first["workers"] = len(answers)
        return answers[0][0], json.dumps(first).encode() + b"\n", "application/json"

    async def _ask(self, w: Worker, method: str, path: str,
                   headers: dict[str, str] | None = None, raw: bool = False) -> tuple[int, Any]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", w.port), 2)
        except (OSError, TimeoutError):
            return 0, None
        try:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: worker\r\nContent-Length: 0\r\n"
                         f"{extra}\r\n".encode())
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
        except (OSError, TimeoutError):
            return 0, None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return 0, None
        if raw:
            return status, body
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None


_STATE_ORDER = ["failed", "starting", "stopped", "draining", "paused", "running", "finished"]


def merge_pipelines(per_worker: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One view of each pipeline over the workers that run it: figures summed,
    the least healthy state, the latest error."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for pipelines in per_worker:
        for p in pipelines:
            by_name.setdefault(p["name"], []).append(p)
    out = []
    for parts in by_name.values():
        first = parts[0]
        merged = dict(first)
        merged["state"] = min((p["state"] for p in parts),
                              key=lambda s: _STATE_ORDER.index(s) if s in _STATE_ORDER else 0)
        merged["connected"] = all(p["connected"] for p in parts)
        merged["paused"] = all(p["paused"] for p in parts)
        for group in ("rates", "in_flight", "totals"):
            merged[group] = {k: sum(p[group][k] for p in parts) for k in first[group]}
        merged["lag"] = max(p["lag"] for p in parts)
        merged["restarts"] = sum(p["restarts"] for p in parts)
        merged["reloads"] = sum(p.get("reloads", 0) for p in parts)
        errors = [p["last_error"] for p in parts if p.get("last_error")]
        merged["last_error"] = max(errors, key=lambda e: e["at"] or "") if errors else None
        merged["sinks"] = [
            {**s, **{k: sum(p["sinks"][i][k] for p in parts)
                     for k in ("written", "queued", "dead_lettered")}}
            for i, s in enumerate(first["sinks"])
        ]
        length = min(len(p["history"]) for p in parts)
        merged["history"] = [
            [first["history"][-length + j][0],
             sum(p["history"][-length + j][1] for p in parts),
             sum(p["history"][-length + j][2] for p in parts)]
            for j in range(length)
        ] if length else []
        merged["workers"] = len(parts)
        out.append(merged)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------ the pod's listener


def pool_server(address: str, pool: WorkerPool) -> Any:
    """The ops listener of the parent: the same paths as a single process's."""
    from ..ops.admin import Response
    from ..ops.http import OpsServer

    class PoolOpsServer(OpsServer):
        async def _readiness(self) -> tuple[bool, dict[str, Any]]:
            ok, workers = await pool.ready()
            return ok, {"workers": workers}

        def _metrics(self) -> bytes:
            return pool.metrics()

        async def _rest(self, method: str, path: str, headers: dict[str, str], query: str,
                        body: bytes) -> Response:
            if path == "/openapi.json" or path.startswith(("/pipelines", "/reload")):
                status, payload, ctype = await pool.forward(method, path, headers)
                return Response(status, ctype, payload)
            if path == "/":
                status, payload, _ = await pool.forward("GET", "/pipelines", headers)
                if status != 200:
                    return Response(status, "text/plain", payload)
                from ..ops.page import render

                doc = json.loads(payload)
                return Response(200, "text/html; charset=utf-8",
                                render(doc["pipelines"], mutable=False).encode())
            return Response(404, "text/plain",
                            b"not found: try /healthz, /readyz, /metrics, /pipelines\n")

    return PoolOpsServer(address, lambda: (True, {}))


async def serve_pool(loaded: LoadedFile, count: int, worker_args: Sequence[str],
                     http_address: str | None, instance: str) -> int:
    """``natsconn run --workers N``: start, supervise and stop the workers."""
    spec = loaded.spec
    pool = WorkerPool(loaded.file, count, worker_args, spec.shutdown_timeout,
                      spec.restart_backoff, spec.restart_backoff_max, instance)
    single = not_shared(loaded)
    if single:
        log.info("%d workers; in worker 0 only (their sources cannot be shared): %s",
                 count, ", ".join(single))
    server = None
    address = http_address or spec.http.address
    if spec.http.enabled and address != "off":
        server = pool_server(address, pool)
        await server.start()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: stopping %d workers; each finishes its in-flight work", sig.name,
                     count)
            pool.stop()
        else:
            log.warning("%s again: killing the workers", sig.name)
            pool.kill()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, pool.send, signal.SIGHUP)
    try:
        return await pool.run()
    finally:
        if server is not None:
            await server.close()
