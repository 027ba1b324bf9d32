"""Issue 4: Redis restarted mid-stream (``scripts/services restart redis``, which
keeps the data): natsconn reconnects by itself, nothing is lost from the stream
source, and the Redis sink writes everything at least once.

One test only, because the restart also interrupts whatever else uses the
shared Redis at that moment. Two pipelines run through the restart together:
``redis_stream → jetstream`` (exactly once thanks to ``Nats-Msg-Id``) and
``jetstream → redis_stream`` (at least once: XADD cannot deduplicate).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from ..helpers import (
    assert_all_present,
    assert_exactly,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    stream_count,
    wait_stream_count,
    wait_until,
)
from .redis_helpers import at, fill_stream, pending

pytestmark = pytest.mark.integration

N = 20_000
SERVICES = Path(__file__).resolve().parents[3] / "scripts" / "services"
FLOW: dict[str, Any] = {"batch": {"max_messages": 100, "max_wait": "10ms"},
                        "max_in_flight": 1}


async def _restart_redis() -> float:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(SERVICES), "restart", "redis", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode(errors="replace")
    return time.monotonic() - started


async def test_redis_restart_mid_stream(
        nc: NATS, r: aioredis.Redis, nats_url: str, redis_address: tuple[str, int],
        unique: str, tmp_path: Path) -> None:
    rs_in, group, rs_out = f"it:{unique}:rs-in", f"g-{unique}", f"it:{unique}:rs-out"
    js_in, js_out = f"RS_IN_{unique}", f"RS_OUT_{unique}"
    from_redis, to_redis = f"from-redis-{unique}", f"to-redis-{unique}"
    await fill_stream(r, rs_in, N)
    await create_stream(nc, js_in, [f"rsin.{unique}.>"])
    await publish_js(nc, f"rsin.{unique}.x", N)
    file = pipeline_file(tmp_path, [
        {"name": from_redis,
         "source": {"type": "redis_stream", **at(redis_address), "streams": [rs_in],
                    "group": group, "consumer": "restart-1", "min_idle_time": "5s"},
         "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"rsout.{unique}.x",
                  "stream": js_out, "stream_subjects": [f"rsout.{unique}.>"]},
         **FLOW},
        {"name": to_redis,
         "source": {"type": "jetstream", "servers": [nats_url], "stream": js_in,
                    "durable": f"rs-{unique}"},
         "sink": {"type": "redis_stream", **at(redis_address), "stream": rs_out},
         **FLOW},
    ])
    async with natsconn_process(file) as proc:
        await wait_until(lambda: _at_least(nc, js_out, 2000), 60, "2000 through from Redis")
        took = await _restart_redis()
        at_restart = await stream_count(nc, js_out)
        assert at_restart < N, "everything was through before the restart: not mid-stream"
        await wait_stream_count(nc, js_out, N, timeout=120)
        await wait_until(lambda: _xlen_at_least(r, rs_out, N), 120, f"{N} entries in {rs_out}")
        await wait_until(lambda: _no_pending(r, rs_in, group), 30, "XPENDING 0")
        metrics = await proc.metrics()
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0, proc.log()

    for pipeline in (from_redis, to_redis):
        lost = metrics.get(("natsconn_disconnects_total", pipeline), 0)
        back = metrics.get(("natsconn_reconnects_total", pipeline), 0)
        assert lost >= 1 and back >= 1, (
            f"{pipeline}: disconnects {lost}, reconnects {back}: the restart went unseen")
    got = [seq_of(m.data) for m in await read_stream(nc, js_out)]
    assert_exactly(got, N, f"JetStream {js_out} (from the Redis stream)")
    entries: Any = await r.xrange(rs_out)
    written = [seq_of(fields[b"data"]) for _, fields in entries]
    assert_all_present(written, N, f"Redis stream {rs_out}")
    print(f"\nRedis restarted in {took:.1f}s with {at_restart} of {N} through; stream source: "
          f"all {N} once, XPENDING 0; stream sink: all {N}, {len(written) - N} twice")


async def _at_least(nc: NATS, stream: str, count: int) -> bool:
    try:
        return await stream_count(nc, stream) >= count
    except Exception:
        return False


async def _xlen_at_least(r: aioredis.Redis, stream: str, count: int) -> bool:
    try:
        return int(await r.xlen(stream)) >= count
    except Exception:  # the test's own client may see the restart too
        return False


async def _no_pending(r: aioredis.Redis, stream: str, group: str) -> bool:
    try:
        return await pending(r, stream, group) == 0
    except Exception:
        return False
