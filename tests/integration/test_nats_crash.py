"""Issue 2: ``kill -9`` of ``natsconn run`` in the middle of a JetStream-sourced
stream, then a restart: nothing lost. SIGTERM: in-flight work finished and
acked, process exits 0 within the shutdown timeout, nothing redelivered."""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from .helpers import (
    Collector,
    NatsconnProcess,
    ack_floor,
    assert_all_present,
    assert_exactly,
    consumer_info,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    stream_count,
    wait_consumer_drained,
    wait_stream_count,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

N = 30_000
KILL_AT = 3_000  # messages through before the kill

# Small batches and one write at a time keep the flow slow enough to be caught
# mid-stream; a short ack_wait brings back what the killed process held.
FLOW: dict[str, Any] = {"batch": {"max_messages": 100, "max_wait": "10ms"}, "max_in_flight": 1,
                        "in_progress_interval": "1s"}


def _source(nats_url: str, stream: str, durable: str) -> dict[str, Any]:
    return {"type": "jetstream", "servers": [nats_url], "stream": stream, "durable": durable,
            "ack_wait": "2s"}


async def _kill_mid_stream(file: Path, through: Callable[[], Awaitable[int]]) -> int:
    """Run natsconn until ``through()`` reaches KILL_AT, SIGKILL it; returns the
    count at the kill (which must be short of N: the kill was mid-stream)."""
    async with natsconn_process(file, log_name="run1.log") as proc:
        count = 0

        async def far_enough() -> bool:
            nonlocal count
            count = await through()
            return count >= KILL_AT

        await wait_until(far_enough, 60, f"{KILL_AT} messages through natsconn", 0.02)
        proc.proc.send_signal(signal.SIGKILL)
        assert await proc.wait_exit(10) == -signal.SIGKILL
        count = await through()
    assert count < N, f"natsconn finished ({count}) before it could be killed mid-stream"
    return count


async def test_kill_9_jetstream_to_jetstream_dedupe_exactly_once(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    source, target, durable = f"K9_IN_{unique}", f"K9_OUT_{unique}", f"k9-{unique}"
    await create_stream(nc, source, [f"k9in.{unique}.>"])
    await publish_js(nc, f"k9in.{unique}.x", N)
    file = pipeline_file(tmp_path, [{
        "name": f"k9-js-{unique}",
        "source": _source(nats_url, source, durable),
        "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"k9out.{unique}.x",
                 "stream": target, "stream_subjects": [f"k9out.{unique}.>"]},
        **FLOW,
    }])

    async def in_target() -> int:
        try:
            return await stream_count(nc, target)
        except Exception:
            return 0

    at_kill = await _kill_mid_stream(file, in_target)
    floor = await ack_floor(nc, source, durable)
    assert floor <= at_kill  # nothing is acked before it is written
    async with natsconn_process(file, log_name="run2.log"):
        await wait_stream_count(nc, target, N, timeout=60)
        await wait_consumer_drained(nc, source, durable, timeout=30)
    got = await read_stream(nc, target)
    # Exactly once: the restart redelivers what the killed process had not
    # acked, and Nats-Msg-Id (the source's stream:seq) drops what it had written.
    assert_exactly([seq_of(m.data) for m in got], N, f"stream {target} (killed at {at_kill})")
    assert await ack_floor(nc, source, durable) == N
    print(f"killed with {at_kill} written, {floor} acked: {at_kill - floor} written "
          "but unacked came again and were deduplicated")


async def test_kill_9_jetstream_to_core_nats_at_least_once(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    source, durable = f"K9C_IN_{unique}", f"k9c-{unique}"
    await create_stream(nc, source, [f"k9cin.{unique}.>"])
    await publish_js(nc, f"k9cin.{unique}.x", N)
    out = await Collector.subscribe(nc, f"k9cout.{unique}.>")
    file = pipeline_file(tmp_path, [{
        "name": f"k9-core-{unique}",
        "source": _source(nats_url, source, durable),
        "sink": {"type": "nats", "servers": [nats_url], "subject": f"k9cout.{unique}.x"},
        **FLOW,
    }])

    async def received() -> int:
        return len(out)

    at_kill = await _kill_mid_stream(file, received)
    async with natsconn_process(file, log_name="run2.log"):
        await wait_until(lambda: set(out.seqs()) >= set(range(N)), 60,
                         f"every one of {N} sequence numbers on the core subscriber")
        await wait_consumer_drained(nc, source, durable, timeout=30)
    assert_all_present(out.seqs(), N, f"core subscriber (killed at {at_kill})")
    print(f"killed at {at_kill}; {len(out) - N} duplicates after the restart")


async def test_sigterm_finishes_in_flight_work_and_acks_it(
        nc: NATS, nats_url: str, nats_address: tuple[str, int], unique: str,
        tmp_path: Path, tcp_proxy: Any) -> None:
    """The sink's connection is stalled so a full window of writes is surely in
    flight at SIGTERM; it is resumed after the signal. Those writes must finish
    and be acked, the process must exit 0 within the shutdown timeout, and a new
    run must deliver each remaining message once: no duplicates (dedupe is off,
    so a redelivery of something already written would show as a second copy)."""
    n = 10_000
    shutdown_timeout = 10.0
    source, target, durable = f"ST_IN_{unique}", f"ST_OUT_{unique}", f"st-{unique}"
    pipeline = f"sigterm-{unique}"
    await create_stream(nc, source, [f"stin.{unique}.>"])
    await create_stream(nc, target, [f"stout.{unique}.>"])
    await publish_js(nc, f"stin.{unique}.x", n)
    proxy = await tcp_proxy(*nats_address)
    # Slow the sink's connection so that the stall below lands mid-stream: unslowed,
    # the pipeline can write all n before the test sees the first write.
    proxy.delay = 0.05
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": _source(nats_url, source, durable) | {"ack_wait": "30s"},
        "sink": {"type": "jetstream", "servers": [f"nats://{proxy.address}"],
                 "subject": f"stout.{unique}.x", "dedupe": False},
        "batch": {"max_messages": 100}, "max_in_flight": 2,
    }], shutdown_timeout=f"{shutdown_timeout}s")

    async with natsconn_process(file, log_name="run1.log") as proc:
        await wait_until(lambda: _nonzero(stream_count(nc, target)), 30,
                         "the first writes in the target stream")
        proxy.stall()
        await wait_until(lambda: _in_flight_full(proc, pipeline, 300), 10,
                         "a full in-flight window behind the stalled sink")
        in_flight = await proc.metric("natsconn_in_flight_messages", pipeline)
        acked_before = await ack_floor(nc, source, durable)
        proc.signal(signal.SIGTERM)
        signalled = time.monotonic()
        await wait_until(lambda: "stopping; finishing in-flight work" in proc.log(), 5,
                         "the SIGTERM log line")
        proxy.delay = 0.0
        proxy.resume()
        code = await proc.wait_exit(shutdown_timeout + 5)
        took = time.monotonic() - signalled
        log = proc.log()
    print(f"SIGTERM with {in_flight:.0f} in flight: exit {code} after {took:.2f}s")
    assert code == 0, log
    assert took < shutdown_timeout, f"exit took {took:.1f}s"
    assert "abandoned" not in log, log

    written = [seq_of(m.data) for m in await read_stream(nc, target)]
    k = len(written)
    # Everything in flight at the signal was written, once, and nothing more read...
    assert k == acked_before + in_flight, (k, acked_before, in_flight)
    assert_exactly(written, k, f"stream {target} after SIGTERM")
    info = await consumer_info(nc, source, durable)
    floor = await ack_floor(nc, source, durable)
    assert floor == k, f"written {k}, ack floor {floor}: {info}"  # ...and all of it acked
    assert info.num_redelivered == 0, info
    print(f"after SIGTERM: {k} written and acked, num_ack_pending {info.num_ack_pending}")

    second = time.monotonic()
    async with natsconn_process(file, log_name="run2.log"):
        # Well within ack_wait (30s): what run 1 had prefetched but not
        # written was handed back (nak) at its close, not held until ack_wait.
        await wait_consumer_drained(nc, source, durable, timeout=20)
        await wait_stream_count(nc, target, n, timeout=10)
    print(f"second run drained in {time.monotonic() - second:.1f}s")
    got = [seq_of(m.data) for m in await read_stream(nc, target)]
    assert_exactly(got, n, f"stream {target} after the second run")


async def _nonzero(count: Awaitable[int]) -> bool:
    return await count > 0


async def _in_flight_full(proc: NatsconnProcess, pipeline: str, bound: int) -> bool:
    return await proc.metric("natsconn_in_flight_messages", pipeline) >= bound
