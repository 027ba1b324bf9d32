"""Issue 2: /readyz and /metrics report the running pipelines' figures; /readyz
is 503 while a pipeline cannot connect, and the log names the pipeline and the
cause. ``natsconn run`` as a process, read over HTTP as Prometheus and a
Kubernetes probe would."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from .helpers import (
    Collector,
    NatsconnProcess,
    create_stream,
    free_port,
    natsconn_process,
    payload,
    pipeline_file,
    publish_js,
    wait_stream_count,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]


def _js_source(nats_url: str, stream: str) -> dict[str, Any]:
    return {"type": "jetstream", "servers": [nats_url], "stream": stream}


async def _wait_out(proc: NatsconnProcess, pipeline: str, count: int) -> None:
    async def done() -> bool:
        return await proc.metric("natsconn_messages_out_total", pipeline) >= count

    await wait_until(done, 30, f"{count} messages out of {pipeline} in /metrics")


async def test_readyz_and_metrics_report_running_pipelines(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    to_core, to_js = f"ops-core-{unique}", f"ops-js-{unique}"
    n_core, n_js, more = 700, 300, 250
    await create_stream(nc, f"OPS_A_{unique}", [f"opsa.{unique}.>"])
    await create_stream(nc, f"OPS_B_{unique}", [f"opsb.{unique}.>"])
    await publish_js(nc, f"opsa.{unique}.x", n_core)
    await publish_js(nc, f"opsb.{unique}.x", n_js)
    out = await Collector.subscribe(nc, f"opsout.{unique}.>")
    file = pipeline_file(tmp_path, [
        {"name": to_core, "source": _js_source(nats_url, f"OPS_A_{unique}"),
         "sink": {"type": "nats", "servers": [nats_url], "subject": f"opsout.{unique}.x"},
         "batch": {"max_messages": 100}},
        {"name": to_js, "source": _js_source(nats_url, f"OPS_B_{unique}"),
         "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"opsjs.{unique}.x",
                  "stream": f"OPS_C_{unique}", "stream_subjects": [f"opsjs.{unique}.>"]},
         "batch": {"max_messages": 100}},
    ])
    async with natsconn_process(file) as proc:
        state = await proc.wait_ready()
        assert state == {"ready": True, "pipelines": {to_core: "running", to_js: "running"}}
        assert await proc.http_get("/healthz") == (200, b"ok\n")
        await _wait_out(proc, to_core, n_core)
        await _wait_out(proc, to_js, n_js)
        await wait_until(lambda: _settled(proc, [to_core, to_js]), 10, "in-flight 0")
        metrics = await proc.metrics()
        for pipeline, n in ((to_core, n_core), (to_js, n_js)):
            nbytes = sum(len(payload(i)) for i in range(n))

            def m(name: str, pipeline: str = pipeline) -> float:
                return metrics.get((name, pipeline), -1.0)

            assert m("natsconn_messages_in_total") == n, pipeline
            assert m("natsconn_messages_out_total") == n, pipeline
            assert m("natsconn_bytes_in_total") == nbytes, pipeline
            assert m("natsconn_bytes_out_total") == nbytes, pipeline
            batches = m("natsconn_batches_written_total")
            assert n / 100 <= batches <= n, (pipeline, batches)
            assert m("natsconn_write_seconds_count") == batches, pipeline
            assert m("natsconn_in_flight_messages") == 0, pipeline
            assert m("natsconn_pipeline_up") == 1, pipeline
            assert m("natsconn_source_lag") == 0, pipeline
            assert m("natsconn_dead_lettered_total") in (0, -1), pipeline
            assert m("natsconn_retries_total") in (0, -1), pipeline
        assert len(out) == n_core
        await wait_stream_count(nc, f"OPS_C_{unique}", n_js, timeout=5)

        # The figures follow the flow: more into one pipeline moves its counters only.
        await publish_js(nc, f"opsa.{unique}.x", more, start=n_core)
        await _wait_out(proc, to_core, n_core + more)
        metrics = await proc.metrics()
        assert metrics[("natsconn_messages_in_total", to_core)] == n_core + more
        assert metrics[("natsconn_messages_out_total", to_js)] == n_js
        await out.wait_for(n_core + more, timeout=5)
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(15) == 0, proc.log()


async def _settled(proc: NatsconnProcess, pipelines: list[str]) -> bool:
    metrics = await proc.metrics()
    return all(metrics.get(("natsconn_in_flight_messages", p)) == 0 for p in pipelines)


def _bad_file(tmp_path: Path, nats_url: str, unique: str, closed: int) -> Path:
    return pipeline_file(tmp_path, [
        {"name": f"fine-{unique}", "source": _js_source(nats_url, f"OPS_F_{unique}"),
         "sink": {"type": "nats", "servers": [nats_url], "subject": f"opsfine.{unique}.x"}},
        {"name": f"unreachable-{unique}", "source": {"type": "generate", "rate": 10},
         "sink": {"type": "nats", "servers": [f"nats://127.0.0.1:{closed}"],
                  "reconnect_wait": "200ms"}},
    ], shutdown_timeout="2s")


async def test_readyz_503_while_a_pipeline_cannot_connect(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    fine, bad = f"fine-{unique}", f"unreachable-{unique}"
    closed = free_port()  # nothing listens there
    await create_stream(nc, f"OPS_F_{unique}", [f"opsfine.{unique}.in"])
    out = await Collector.subscribe(nc, f"opsfine.{unique}.x")
    file = _bad_file(tmp_path, nats_url, unique, closed)
    async with natsconn_process(file, ready=False) as proc:

        async def fine_running() -> bool:
            _, state = await proc.readyz()
            return bool(state.get("pipelines", {}).get(fine) == "running")

        await wait_until(fine_running, 20, f"pipeline {fine} running")
        for _ in range(5):  # and it stays 503, not ready, for as long as it cannot connect
            status, state = await proc.readyz()
            assert status == 503, (status, state)
            assert state["ready"] is False and state["pipelines"][fine] == "running", state
            assert state["pipelines"][bad] != "running", state
            await asyncio.sleep(0.4)
        # The other pipeline is not held back.
        await publish_js(nc, f"opsfine.{unique}.in", 100)
        await out.wait_for(100, timeout=10)
        metrics = await proc.metrics()
        assert metrics[("natsconn_pipeline_up", fine)] == 1
        assert metrics.get(("natsconn_pipeline_up", bad), 0) == 0
        lines = [json.loads(line) for line in proc.log().splitlines()
                 if line.startswith("{")]
    about_bad = [r for r in lines if r["level"] in ("warning", "error")
                 and (r.get("pipeline") == bad or bad in r.get("logger", ""))]
    assert about_bad, f"no warning or error names pipeline {bad}:\n{proc.log()}"
    # "Connection refused" (uvloop) or "[Errno 111] Connect call failed" (asyncio)
    assert any(("refused" in r["msg"].lower() or "errno 111" in r["msg"].lower())
               for r in about_bad), about_bad[:3]


async def test_sigterm_while_a_pipeline_cannot_connect_exits_promptly(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    """shutdown_timeout is 2s: a pipeline still connecting has nothing in
    flight, so the stop must not wait for a connect that never ends (nats-py
    retries an initial connect for ever when max_reconnect_attempts is -1,
    natsconn's default). Before 91ee73c this took shutdown_timeout + 5s and
    ended in a CancelledError traceback with exit code 1."""
    await create_stream(nc, f"OPS_F_{unique}", [f"opsfine.{unique}.in"])
    file = _bad_file(tmp_path, nats_url, unique, free_port())
    async with natsconn_process(file, ready=False) as proc:
        await wait_until(lambda: "pipeline running" in proc.log(), 20, "the fine pipeline")
        proc.signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await proc.wait_exit(20)
        took = time.monotonic() - signalled
        log = proc.log()
    assert code == 0 and took <= 2.5, (
        f"SIGTERM with a pipeline stuck connecting: exit code {code} after {took:.1f}s "
        f"(shutdown_timeout 2s); log tail:\n{log[-1500:]}")
