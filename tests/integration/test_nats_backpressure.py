"""Issue 2: a stalled sink keeps natsconn's in-flight count and RSS flat while
the JetStream backlog grows (a test that reads them), then everything drains.

``natsconn run`` as a process; its JetStream sink goes through a TCP proxy that
the test stalls. Messages keep arriving in the source stream at about
2,000/s of 2 KiB (~4 MiB/s): if natsconn read them while the sink cannot
write, its RSS would grow by tens of MiB over the sampling; it must stay
within a few, and the stream's consumer must show the backlog instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from .helpers import (
    assert_exactly,
    consumer_info,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    wait_consumer_drained,
    wait_stream_count,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

MAX_MESSAGES, MAX_IN_FLIGHT = 100, 2
WINDOW = MAX_MESSAGES * (MAX_IN_FLIGHT + 1)  # the engine's bound on read-but-unacked
RSS_GROWTH_BOUND = 30 * 1024 * 1024
SAMPLE_SECONDS = 15.0
PAD = b"x" * 2048


def _big(seq: int) -> bytes:
    return b'{"seq":%d,"pad":"%s"}' % (seq, PAD)


class Publisher:
    """Publishes ~rate msg/s into the source stream until stopped.

    It stops between chunks rather than by cancellation: nats-py 2.16 breaks
    a connection whose flush() was cancelled (the PONG then finds a cancelled
    future and the read loop dies).
    """

    def __init__(self, nc: NATS, subject: str, rate: int = 2000, chunk: int = 200) -> None:
        self.nc, self.subject, self.chunk = nc, subject, chunk
        self.interval = chunk / rate
        self.sent = 0
        self._stop = asyncio.Event()

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            await publish_js(self.nc, self.subject, self.chunk, start=self.sent, data=_big)
            self.sent += self.chunk
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(),
                                       max(0.0, self.interval - (time.monotonic() - started)))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Publisher]:
        task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.wait_for(task, 30)


async def test_stalled_sink_keeps_in_flight_and_rss_flat_while_backlog_grows(
        nc: NATS, nats_url: str, nats_address: tuple[str, int], unique: str,
        tmp_path: Path, tcp_proxy: Any) -> None:
    source, target, durable = f"BP_IN_{unique}", f"BP_OUT_{unique}", f"bp-{unique}"
    pipeline = f"bp-{unique}"
    await create_stream(nc, source, [f"bpin.{unique}.>"])
    await create_stream(nc, target, [f"bpout.{unique}.>"])
    proxy = await tcp_proxy(*nats_address)
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                   "durable": durable},
        "sink": {"type": "jetstream", "servers": [f"nats://{proxy.address}"],
                 "subject": f"bpout.{unique}.x", "ack_timeout": "5s"},
        "batch": {"max_messages": MAX_MESSAGES}, "max_in_flight": MAX_IN_FLIGHT,
    }])
    samples: list[tuple[float, float, int, int]] = []  # (t, in flight, rss, num_pending)
    publisher = Publisher(nc, f"bpin.{unique}.x")
    async with natsconn_process(file) as proc:
        async with publisher.running():

            async def flowing() -> bool:
                return await proc.metric("natsconn_messages_out_total", pipeline) >= 4000

            await wait_until(flowing, 30, "4000 messages through before the stall")
            proxy.stall()

            async def window_full() -> bool:
                return await proc.metric("natsconn_in_flight_messages", pipeline) >= WINDOW

            await wait_until(window_full, 10, "a full in-flight window behind the stall")
            await asyncio.sleep(1.0)  # warm-up: the cost of a full window is in the baseline
            started = time.monotonic()
            while time.monotonic() - started < SAMPLE_SECONDS:
                info = await consumer_info(nc, source, durable)
                samples.append((time.monotonic() - started,
                                await proc.metric("natsconn_in_flight_messages", pipeline),
                                proc.rss_bytes(), info.num_pending or 0))
                await asyncio.sleep(0.5)
            written_while_stalled = await proc.metric("natsconn_messages_out_total", pipeline)
        sent = publisher.sent
        proxy.resume()
        await wait_consumer_drained(nc, source, durable, timeout=60)
        await wait_stream_count(nc, target, sent, timeout=10)

    in_flight = [s[1] for s in samples]
    rss = [s[2] for s in samples]
    backlog = [s[3] for s in samples]
    growth = max(rss) - rss[0]
    print(f"{len(samples)} samples over {SAMPLE_SECONDS}s: in flight max {max(in_flight):.0f} "
          f"(bound {WINDOW}); RSS {rss[0] / 2**20:.1f} -> max {max(rss) / 2**20:.1f} MiB "
          f"(+{growth / 2**20:.1f}); backlog {backlog[0]} -> {backlog[-1]}; "
          f"{sent} published, {written_while_stalled:.0f} written before the resume")
    assert max(in_flight) <= WINDOW, in_flight
    assert growth <= RSS_GROWTH_BOUND, [r // 2**20 for r in rss]
    # The backlog stays in the stream: the consumer's num_pending grows all along
    # (at ~2000 msg/s published, by well over half of what the sampling should see).
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(backlog)), backlog
    assert backlog[-1] - backlog[0] >= 0.5 * 2000 * SAMPLE_SECONDS, backlog
    got = await read_stream(nc, target)
    assert_exactly([seq_of(m.data) for m in got], sent, f"stream {target} after the resume")
