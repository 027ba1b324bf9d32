"""The supervisor: several pipelines, restarts of a failing one, readiness, stop."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

from connector.engine import PipelineState, Supervisor

from ._fakes import FakeSink, FakeSource, load, pipeline_spec, unique, until


def flowing(name: str, key: str, **source: Any) -> dict[str, Any]:
    """A pipeline whose fake source gives one message every 2 ms, written at once."""
    return pipeline_spec(
        name=name,
        source={"type": "fake", "key": key, "per_read": 1, "pause": "2ms", **source},
        batch={"max_messages": 1, "max_wait": "1ms"},
    )


def sink_of(sup: Supervisor, name: str) -> FakeSink:
    pipe = sup.records[name].current
    assert pipe is not None
    return cast(FakeSink, pipe.sink)


async def test_a_pipeline_failing_to_connect_restarts_while_the_other_keeps_running() -> None:
    steady, flaky = unique("steady"), unique("flaky")
    loaded = load(
        flowing(steady, steady),
        flowing(flaky, flaky, connect_failures=3),
        restart_backoff="5ms", restart_backoff_max="10ms",
    )
    sup = Supervisor(loaded)
    task = asyncio.create_task(sup.run())
    try:
        await until(lambda: sup.records[flaky].restarts >= 1)
        written_at_first_failure = len(sink_of(sup, steady).written)
        await until(lambda: sup.ready()[0] and len(sink_of(sup, flaky).written) > 0)
        assert len(sink_of(sup, steady).written) > written_at_first_failure, \
            "the healthy pipeline stopped while the other one was failing"
        rec = sup.records[flaky]
        assert rec.restarts == 3
        assert FakeSource.connect_attempts[flaky] == 4
        assert rec.last_error is not None
        assert "fake connect failure 3" in rec.last_error
        assert "source" in rec.last_error
        assert sup.records[steady].restarts == 0
        assert len(FakeSource.instances[steady]) == 1, "the healthy pipeline was rebuilt"
    finally:
        sup.stop(timeout=1)
        await asyncio.wait_for(task, 3)
    assert sup.ready()[1] == {steady: "stopped", flaky: "stopped"}


async def test_readiness_follows_pipeline_states() -> None:
    steady, flaky = unique("steady"), unique("flaky")
    loaded = load(
        flowing(steady, steady),
        flowing(flaky, flaky, connect_failures=1),
        restart_backoff="150ms", restart_backoff_max="150ms",
    )
    sup = Supervisor(loaded)
    assert sup.ready() == (False, {steady: "starting", flaky: "starting"})
    task = asyncio.create_task(sup.run())
    try:
        await until(lambda: sup.records[flaky].restarts == 1
                    and sup.ready()[1][steady] == "running")
        ok, states = sup.ready()
        assert not ok
        assert states == {steady: "running", flaky: "failed"}
        await until(lambda: sup.ready()[0])
        assert sup.ready() == (True, {steady: "running", flaky: "running"})
    finally:
        sup.stop(timeout=1)
        await asyncio.wait_for(task, 3)
    ok, states = sup.ready()
    assert not ok
    assert set(states.values()) == {"stopped"}


async def test_finished_pipelines_count_as_ready_and_run_returns() -> None:
    name = unique("finite")
    loaded = load(pipeline_spec(name=name, source={"type": "fake", "key": name}))
    sup = Supervisor(loaded)
    task = asyncio.create_task(sup.run())
    await until(lambda: sup.ready()[0])
    source = FakeSource.instances[name][0]
    source.end()
    await asyncio.wait_for(task, 3)
    pipe = sup.records[name].current
    assert pipe is not None and pipe.state is PipelineState.FINISHED
    assert sup.ready() == (True, {name: "finished"})
    assert sup.records[name].ended is not None
    assert sup.records[name].restarts == 0


async def test_stop_during_restart_backoff_returns_promptly() -> None:
    name = unique("down")
    loaded = load(flowing(name, name, connect_failures=1000),
                  restart_backoff="10s", restart_backoff_max="10s")
    sup = Supervisor(loaded)
    task = asyncio.create_task(sup.run())
    await until(lambda: sup.records[name].restarts == 1)
    sup.stop(timeout=1)
    await asyncio.wait_for(task, 1)
    assert FakeSource.connect_attempts[name] == 1


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    head, _, body = raw.partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), body


async def test_readyz_and_metrics_over_http_follow_the_supervisor() -> None:
    from connector.ops.http import OpsServer

    name = unique("http")
    loaded = load(flowing(name, name, connect_failures=1),
                  restart_backoff="100ms", restart_backoff_max="100ms")
    sup = Supervisor(loaded)
    server = OpsServer("127.0.0.1:0", sup.ready)
    await server.start()
    task = asyncio.create_task(sup.run())
    try:
        await until(lambda: sup.records[name].restarts == 1)
        status, body = await _get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body) == {"ready": False, "pipelines": {name: "failed"}}
        await until(lambda: sup.ready()[0] and len(sink_of(sup, name).written) > 0)
        status, body = await _get(server.port, "/readyz")
        assert status == 200
        assert json.loads(body) == {"ready": True, "pipelines": {name: "running"}}
        assert (await _get(server.port, "/healthz"))[0] == 200
        status, metrics = await _get(server.port, "/metrics")
        assert status == 200
        assert f'natsconn_pipeline_up{{pipeline="{name}"}} 1.0' in metrics
        assert f'natsconn_pipeline_restarts_total{{pipeline="{name}"}} 1.0' in metrics
        assert f'natsconn_messages_out_total{{pipeline="{name}"}}' in metrics
    finally:
        sup.stop(timeout=1)
        await asyncio.wait_for(task, 3)
        await server.close()
