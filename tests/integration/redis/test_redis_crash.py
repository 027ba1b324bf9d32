"""Issue 4: ``kill -9`` of ``natsconn run`` in the middle of a Redis-sourced
stream, then a restart: nothing lost, for the stream source (pending entries
claimed back) and for the list source (processing list recovered).

To be sure the kill leaves work behind, the JetStream sink's connection runs
through a TCP proxy that is stalled before the kill: a full in-flight window
is then read from Redis and unacknowledged when the process dies. The restart
runs under the same consumer name (its own pending entries / processing list
are taken back at start) or under another one, as when a pod is replaced by
one with a new name (taken back after ``min_idle_time`` / ``lease``).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from ..helpers import (
    NatsconnProcess,
    assert_all_present,
    assert_exactly,
    natsconn_process,
    pipeline_file,
    read_stream,
    seq_of,
    stream_count,
    wait_stream_count,
    wait_until,
)
from .redis_helpers import at, fill_list, fill_stream, pending, pending_by_consumer

pytestmark = pytest.mark.integration

N = 20_000
BATCH = 100
# Small batches and one write at a time keep the flow slow enough to stop mid-stream.
FLOW: dict[str, Any] = {"batch": {"max_messages": BATCH, "max_wait": "10ms"},
                        "max_in_flight": 1, "in_progress_interval": "1s"}
WINDOW = BATCH * 2  # the engine's in-flight window: max_messages * (max_in_flight + 1)


def _sink(proxy_address: str, subject: str, target: str) -> dict[str, Any]:
    return {"type": "jetstream", "servers": [f"nats://{proxy_address}"], "subject": subject,
            "stream": target, "stream_subjects": [subject]}


async def _stall_and_kill(file: Path, proxy: Any, nc: NATS, target: str, pipeline: str,
                          ) -> int:
    """Run until some messages are through, stall the sink, wait for a full
    in-flight window, SIGKILL. Returns how many were in the target then."""
    async with natsconn_process(file, log_name="run1.log") as proc:
        await wait_until(lambda: _at_least(nc, target, 2 * WINDOW), 60,
                         "the first messages in the target stream")
        proxy.stall()
        await wait_until(lambda: _in_flight(proc, pipeline, WINDOW), 20,
                         f"{WINDOW} messages in flight behind the stalled sink")
        proc.signal(signal.SIGKILL)
        assert await proc.wait_exit(10) == -signal.SIGKILL
    proxy.resume()
    through = await stream_count(nc, target)
    assert through < N, f"all {N} through before the kill: nothing was mid-stream"
    return through


@pytest.mark.parametrize("restart_as", ["same", "other"])
async def test_kill_9_stream_source(
        nc: NATS, r: aioredis.Redis, nats_url: str, nats_address: tuple[str, int],
        redis_address: tuple[str, int], unique: str, tmp_path: Path, tcp_proxy: Any,
        restart_as: str) -> None:
    stream, group = f"it:{unique}:k9", f"g-{unique}"
    target, subject = f"K9R_{unique}", f"k9r.{unique}.out"
    pipeline = f"k9-stream-{unique}"
    await fill_stream(r, stream, N)
    proxy = await tcp_proxy(*nats_address)

    def file(consumer: str, name: str) -> Path:
        return pipeline_file(tmp_path, [{
            "name": pipeline,
            "source": {"type": "redis_stream", **at(redis_address), "streams": [stream],
                       "group": group, "consumer": consumer, "min_idle_time": "2s",
                       "claim_interval": "500ms"},
            "sink": _sink(proxy.address, subject, target),  # Nats-Msg-Id: stream:entry id
            **FLOW,
        }], name=name)

    through = await _stall_and_kill(file("replica-a", "run1.yaml"), proxy, nc, target,
                                    pipeline)
    left = await pending_by_consumer(r, stream, group)
    assert left.get("replica-a", 0) >= BATCH, (
        f"expected the killed consumer to hold at least a batch pending, found {left}")
    second = "replica-a" if restart_as == "same" else "replica-b"
    async with natsconn_process(file(second, "run2.yaml"), log_name="run2.log") as proc:
        await wait_stream_count(nc, target, N, timeout=120)
        await wait_until(lambda: _no_pending(r, stream, group), 30, "XPENDING 0")
        log = proc.log()
    assert "claimed" in log, log
    got = await read_stream(nc, target)
    # Exactly once: claimed entries that had been written before the kill are
    # dropped by the JetStream sink's Nats-Msg-Id (the entry id).
    assert_exactly([seq_of(m.data) for m in got], N, f"stream {target}")
    assert await pending(r, stream, group) == 0
    print(f"\nkilled with {through} through and {left} pending; restarted as {second}: "
          f"all {N} delivered once, XPENDING 0")


@pytest.mark.parametrize("restart_as", ["same", "other"])
async def test_kill_9_list_source(
        nc: NATS, r: aioredis.Redis, nats_url: str, nats_address: tuple[str, int],
        redis_address: tuple[str, int], unique: str, tmp_path: Path, tcp_proxy: Any,
        restart_as: str) -> None:
    queue = f"it:{unique}:queue"
    target, subject = f"K9L_{unique}", f"k9l.{unique}.out"
    pipeline = f"k9-list-{unique}"
    await fill_list(r, queue, N)
    proxy = await tcp_proxy(*nats_address)

    def file(consumer: str, name: str) -> Path:
        return pipeline_file(tmp_path, [{
            "name": pipeline,
            "source": {"type": "redis_list", **at(redis_address), "key": queue,
                       "consumer": consumer, "lease": "2s", "claim_interval": "500ms"},
            "sink": _sink(proxy.address, subject, target) | {"dedupe": False},
            **FLOW,
        }], name=name)

    through = await _stall_and_kill(file("replica-a", "run1.yaml"), proxy, nc, target,
                                    pipeline)
    held = await r.llen(f"{queue}:processing:replica-a")
    assert held >= BATCH, f"expected at least a batch in the processing list, found {held}"
    second = "replica-a" if restart_as == "same" else "replica-b"
    async with natsconn_process(file(second, "run2.yaml"), log_name="run2.log") as proc:
        await wait_until(lambda: _at_least(nc, target, N), 120, f"{N} in {target}")
        await wait_until(lambda: _list_drained(r, queue), 30,
                         "queue and processing lists empty")
        log = proc.log()
    assert "went back" in log, log
    got = [seq_of(m.data) for m in await read_stream(nc, target)]
    # At least once: what was written but not yet removed at the kill comes again.
    assert_all_present(got, N, f"stream {target}")
    print(f"\nkilled with {through} through and {held} in the processing list; restarted "
          f"as {second}: all {N} delivered, {len(got) - N} twice")


async def _at_least(nc: NATS, stream: str, count: int) -> bool:
    try:
        return await stream_count(nc, stream) >= count
    except Exception:
        return False


async def _in_flight(proc: NatsconnProcess, pipeline: str, bound: int) -> bool:
    return await proc.metric("natsconn_in_flight_messages", pipeline) >= bound


async def _no_pending(r: aioredis.Redis, stream: str, group: str) -> bool:
    return await pending(r, stream, group) == 0


async def _list_drained(r: aioredis.Redis, queue: str) -> bool:
    keys = [k async for k in r.scan_iter(match=f"{queue}*", _type="list")]
    lengths = [await r.llen(k) for k in keys]
    return sum(lengths) == 0
