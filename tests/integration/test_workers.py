"""Issue 15: ``natsconn run --workers 2`` against real servers. The workers share a
JetStream durable and a Kafka consumer group; a worker killed with ``kill -9``
under load is restarted, nothing is lost, ``/readyz`` goes 503 and back, and the
pod's merged ``/metrics`` counters never go backwards."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from .helpers import (
    NATSCONN,
    NatsconnProcess,
    assert_exactly,
    create_stream,
    free_port,
    parse_metrics,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    stream_count,
    wait_until,
)
from .kafka.kafka_helpers import create_topic, produce

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]


async def start_pool(file: Path, workers: int = 2) -> NatsconnProcess:
    port = free_port()
    log_path = file.with_name(f"pool.{port}.log")
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            NATSCONN, "run", str(file), "--workers", str(workers),
            "--http-address", f"127.0.0.1:{port}", "--log-format", "json",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    return NatsconnProcess(proc, file, log_path, port)


def worker_pids(parent: int) -> list[int]:
    """The parent's child processes (the workers), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent:
            out.append(int(entry.name))
    return sorted(out)


class CounterWatch:
    """Samples the pod's messages_out counter every 50 ms and records any drop."""

    def __init__(self, proc: NatsconnProcess, pipeline: str) -> None:
        self.proc, self.pipeline = proc, pipeline
        self.values: list[float] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            status, body = await self.proc.http_get("/metrics")
            if status == 200:
                value = parse_metrics(body.decode()).get(
                    ("natsconn_messages_out_total", self.pipeline))
                if value is not None:
                    self.values.append(value)
            await asyncio.sleep(0.05)

    async def stop(self) -> list[float]:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.values


async def kill_one_worker_mid_flow(proc: NatsconnProcess, progress: Any, total: int,
                                   pipeline: str) -> None:
    """Wait for a quarter of the flow, SIGKILL one worker, see /readyz go 503 and
    come back with a new worker process."""
    await proc.wait_ready(40)
    await wait_until(lambda: _at_least(progress, total // 4), 90, "a quarter through")
    before = worker_pids(proc.pid)
    assert len(before) == 2, f"expected 2 workers, found {before}"
    os.kill(before[1], signal.SIGKILL)
    await wait_until(lambda: _status_is(proc, 503), 10, "/readyz 503 with a worker dead")
    await wait_until(lambda: _status_is(proc, 200), 60, "/readyz 200 again")
    after = worker_pids(proc.pid)
    assert len(after) == 2 and before[1] not in after, f"worker not replaced: {after}"
    assert '"worker 1 (pid' in proc.log() or "exited with -9" in proc.log()


async def _at_least(progress: Any, n: int) -> bool:
    return bool(await progress() >= n)


async def _status_is(proc: NatsconnProcess, status: int) -> bool:
    got, _ = await proc.http_get("/readyz")
    return got == status


async def test_a_killed_worker_is_replaced_and_jetstream_loses_nothing(
        tmp_path: Path, nc: NATS, nats_url: str, unique: str) -> None:
    src, dst, n = f"WK_IN_{unique}", f"WK_OUT_{unique}", 40_000
    await create_stream(nc, src, [f"wk.in.{unique}.>"])
    await create_stream(nc, dst, [f"wk.out.{unique}.>"])
    await publish_js(nc, lambda i: f"wk.in.{unique}.{i % 8}", n)
    file = pipeline_file(tmp_path, [{
        "name": "shared",
        "source": {"type": "jetstream", "servers": [nats_url], "stream": src,
                   "durable": "d-shared", "ack_wait": "3s"},
        "sink": {"type": "jetstream", "servers": [nats_url], "stream": dst,
                 "subject": f"wk.out.{unique}.{{subject[-1]}}"},
        "batch": {"max_messages": 100, "max_wait": "5ms"}, "max_in_flight": 1,
    }])
    proc = await start_pool(file)
    watch = CounterWatch(proc, "shared")
    try:
        await kill_one_worker_mid_flow(proc, lambda: stream_count(nc, dst), n, "shared")
        await wait_until(lambda: _at_least(lambda: stream_count(nc, dst), n), 120,
                         f"all {n} in {dst}")
        status, body = await proc.http_get("/pipelines")
        doc = json.loads(body)
        assert status == 200 and doc["workers"] == 2
        assert doc["pipelines"][0]["workers"] == 2, "both workers run the shared pipeline"
    finally:
        values = await watch.stop()
        proc.signal(signal.SIGTERM)
        code = await proc.wait_exit(60)
    assert code == 0, proc.log()
    assert len(values) > 20
    drops = [(a, b) for a, b in itertools.pairwise(values) if b < a]
    assert not drops, f"the merged counter went backwards: {drops[:5]}"
    seqs = [seq_of(m.data) for m in await read_stream(nc, dst)]
    assert_exactly(seqs, n, dst)


async def test_a_killed_worker_is_replaced_and_kafka_loses_nothing(
        tmp_path: Path, nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str) -> None:
    topic, dst, n = f"wk-{unique}", f"WKK_OUT_{unique}", 30_000
    await create_topic(kafka_bootstrap, topic, partitions=4)
    await create_stream(nc, dst, [f"wkk.out.{unique}.>"])
    await produce(kafka_bootstrap, topic, n)
    file = pipeline_file(tmp_path, [{
        "name": "group",
        "source": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topics": [topic],
                   "group_id": f"g-{unique}"},
        "sink": {"type": "jetstream", "servers": [nats_url], "stream": dst,
                 "subject": f"wkk.out.{unique}.x"},
        "batch": {"max_messages": 100, "max_wait": "5ms"}, "max_in_flight": 1,
    }])
    proc = await start_pool(file)
    try:
        await kill_one_worker_mid_flow(proc, lambda: stream_count(nc, dst), n, "group")
        # Kafka redelivers from the last commit: duplicates are possible, losses not.
        await wait_until(lambda: _at_least(lambda: stream_count(nc, dst), n), 180,
                         f"all {n} in {dst}")
    finally:
        proc.signal(signal.SIGTERM)
        await proc.wait_exit(60)
    seqs = {seq_of(m.data) for m in await read_stream(nc, dst)}
    assert seqs == set(range(n)), f"missing: {sorted(set(range(n)) - seqs)[:10]}"


def test_workers_auto_and_a_bad_count_are_checked(tmp_path: Path) -> None:
    import subprocess

    file = pipeline_file(tmp_path, [{"name": "p", "source": {"type": "generate", "count": 1},
                                     "sink": {"type": "drop"}}], workers=0)
    out = subprocess.run([NATSCONN, "validate", str(file)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "expected 1 to 256 workers or 'auto', found 0" in out.stderr
    out = subprocess.run([sys.executable, "-m", "connector.cli", "run", str(file),
                          "--workers", "lots"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "expected a number from 1 to 256 or 'auto'" in out.stderr
