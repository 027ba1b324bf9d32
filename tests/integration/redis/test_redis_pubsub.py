"""Issue 4: Redis pub/sub → NATS delivers while connected; a connection loss is
a window of missed messages that shows in the metrics
(``natsconn_disconnects_total``, ``natsconn_reconnects_total``), and delivery
resumes by itself once Redis is reachable again.

The source reaches Redis through a TCP proxy: ``cut`` with ``refuse`` on keeps
it away for a while, during which Redis reports zero receivers for what is
published (the missed window: at most once, by the nature of pub/sub).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from ..helpers import (
    Collector,
    assert_exactly,
    local_metric,
    payload,
    pipeline_file,
    run_in_process,
    wait_ready_in_process,
    wait_until,
)
from .redis_helpers import at

pytestmark = pytest.mark.integration


async def _publish(r: aioredis.Redis, channel: str, seqs: range) -> list[int]:
    """Receivers per message, as Redis counted them."""
    pipe = r.pipeline(transaction=False)
    for i in seqs:
        pipe.publish(channel, payload(i))
    return [int(n) for n in await pipe.execute()]


async def _subscribers(r: aioredis.Redis, channel: str) -> int:
    counts: Any = await r.pubsub_numsub(channel)
    return int(counts[0][1])


async def test_pubsub_reconnects_and_counts_the_missed_window(
        nc: NATS, r: aioredis.Redis, nats_url: str, redis_address: tuple[str, int],
        unique: str, tmp_path: Path, tcp_proxy: Any) -> None:
    channel, pipeline = f"it:{unique}:ch", f"pubsub-{unique}"
    proxy = await tcp_proxy(*redis_address)
    host, port = proxy.address.rsplit(":", 1)
    out = await Collector.subscribe(nc, f"ps.{unique}.>")
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "redis_pubsub", **at((host, int(port))), "channels": [channel],
                   "ping_interval": "500ms", "socket_timeout": "2s",
                   "reconnect": {"initial_backoff": "100ms", "max_backoff": "500ms"}},
        "sink": {"type": "nats", "servers": [nats_url], "subject": f"ps.{unique}.out"},
    }])

    def metric(name: str) -> float:
        return local_metric(name, pipeline, role="source")

    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await wait_until(lambda: _is(_subscribers(r, channel), 1), 10, "the subscription")
        assert min(await _publish(r, channel, range(0, 1000))) == 1
        await out.wait_for(1000, timeout=30)

        proxy.refuse(True)
        proxy.cut()
        await wait_until(lambda: _is(_subscribers(r, channel), 0), 10,
                         "Redis seeing the subscriber gone")
        missed = await _publish(r, channel, range(1000, 1500))
        assert set(missed) == {0}, "published while away, yet someone received it"
        await wait_until(lambda: metric("natsconn_disconnects_total") >= 1, 10,
                         "the disconnect counted")
        assert metric("natsconn_reconnects_total") == 0

        proxy.refuse(False)
        await wait_until(lambda: _is(_subscribers(r, channel), 1), 20, "subscribed again")
        await wait_until(lambda: metric("natsconn_reconnects_total") >= 1, 10,
                         "the reconnect counted")
        assert min(await _publish(r, channel, range(1500, 2500))) == 1
        await out.wait_for(2000, timeout=30)
        disconnects = metric("natsconn_disconnects_total")
        reconnects = metric("natsconn_reconnects_total")

    got = out.seqs()
    assert_exactly([s for s in got if s < 1000 or s >= 1500] + list(range(1000, 1500)),
                   2500, "core NATS subscriber")
    assert not [s for s in got if 1000 <= s < 1500], "messages of the missed window arrived"
    assert (disconnects, reconnects) == (1, 1), (disconnects, reconnects)
    print(f"\npub/sub: 2000 delivered around one outage; 500 published during it missed "
          f"(0 receivers); disconnects {disconnects:.0f}, reconnects {reconnects:.0f}")


async def _is(value: Any, expected: int) -> bool:
    return bool(await value == expected)
