"""Issue 4: NATS → Redis stream → NATS in one ``natsconn run``, none lost, the
subject and headers carried through Redis, and XPENDING of the group empty at
the end.

Two pipelines side by side: ``jetstream → redis_stream`` and ``redis_stream →
jetstream`` (whose ``Nats-Msg-Id`` is the Redis entry id, so a redelivered
entry cannot double). ``N`` is 20,000 in the suite; set
``NATSCONN_REDIS_ROUNDTRIP_N=200000`` to run the issue's full count by hand
(``pytest -s`` prints the figures).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from ..helpers import (
    ODD_HEADERS,
    assert_exactly,
    assert_headers,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    wait_stream_count,
    wait_until,
)
from .redis_helpers import at, group_lag, pending

pytestmark = pytest.mark.integration

N = int(os.environ.get("NATSCONN_REDIS_ROUNDTRIP_N", "20000"))
PARTS = 10  # input subjects rt.<u>.in.0 … 9, mapped to rtout.<u>.0 … 9


async def test_nats_to_redis_stream_to_nats(
        nc: NATS, r: aioredis.Redis, nats_url: str, redis_address: tuple[str, int],
        unique: str, tmp_path: Path) -> None:
    source, target = f"RT_IN_{unique}", f"RT_OUT_{unique}"
    stream, group = f"it:{unique}:rt", f"g-{unique}"
    await create_stream(nc, source, [f"rt.{unique}.in.>"])
    started = time.monotonic()
    await publish_js(nc, lambda i: f"rt.{unique}.in.{i % PARTS}", N, headers=ODD_HEADERS)
    published = time.monotonic() - started
    file = pipeline_file(tmp_path, [
        {"name": f"to-redis-{unique}",
         "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                    "durable": f"rt-{unique}"},
         "sink": {"type": "redis_stream", **at(redis_address), "stream": stream}},
        {"name": f"from-redis-{unique}",
         "source": {"type": "redis_stream", **at(redis_address), "streams": [stream],
                    "group": group, "consumer": "rt-1"},
         "sink": {"type": "jetstream", "servers": [nats_url],
                  "subject": f"rtout.{unique}.{{subject[-1]}}", "stream": target,
                  "stream_subjects": [f"rtout.{unique}.>"]}},
    ])
    async with natsconn_process(file) as proc:
        ready = time.monotonic()
        await wait_stream_count(nc, target, N, timeout=max(120, N / 1000))
        took = time.monotonic() - ready
        await wait_until(lambda: _settled(r, stream, group), 30,
                         "every entry acknowledged (XPENDING 0, lag 0)")
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0, proc.log()

    assert await r.xlen(stream) == N
    assert await pending(r, stream, group) == 0
    got = await read_stream(nc, target, timeout=max(60, N / 2000))
    assert_exactly([seq_of(m.data) for m in got], N, f"stream {target}")
    wrong = [m.subject for m in got
             if m.subject != f"rtout.{unique}.{seq_of(m.data) % PARTS}"]
    assert not wrong, f"{len(wrong)} subjects not carried through Redis, e.g. {wrong[:3]}"
    assert_headers(got, ODD_HEADERS, f"stream {target}")
    print(f"\n{N} messages: JetStream publish {published:.1f}s; NATS → Redis stream → NATS "
          f"{took:.1f}s after ready ({N / took:,.0f} msg/s end to end, both legs in one "
          "process); XPENDING 0")


async def _settled(r: aioredis.Redis, stream: str, group: str) -> bool:
    return await pending(r, stream, group) == 0 and await group_lag(r, stream, group) == 0
