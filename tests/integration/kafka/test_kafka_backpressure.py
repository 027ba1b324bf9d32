"""Issue 3: a stalled JetStream sink pauses the Kafka partitions: the lag grows at
the broker while natsconn's memory stays flat; when the sink comes back,
everything is delivered (once: Nats-Msg-Id from the offsets).

The sink reaches NATS through the kit's TCP proxy, which the test stalls (the
connection stays open, no byte moves: a hung server or a black-holed route).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from connector.testing.proxy import TcpProxy

from ..helpers import (
    assert_exactly,
    create_stream,
    natsconn_process,
    pipeline_file,
    read_stream,
    seq_of,
    stream_count,
    wait_stream_count,
    wait_until,
)
from .kafka_helpers import create_topic, produce

pytestmark = pytest.mark.integration

BEFORE = 20_000  # flows before the stall
FILL = 10_000  # produced once the sink is stalled: fills the in-flight window
DURING = 50_000  # produced while the sink is stalled, 1 KiB each: ~50 MiB
PAD = b"x" * 1000


def padded(seq: int) -> bytes:
    return b'{"seq":%d,"pad":"%s"}' % (seq, PAD)


async def test_stalled_sink_pauses_partitions(
        nc: NATS, nats_url: str, nats_address: tuple[str, int], kafka_bootstrap: str,
        unique: str, tmp_path: Path, tcp_proxy: object) -> None:
    topic, stream, pipeline = f"bp-{unique}", f"BP_OUT_{unique}", f"bp-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    await create_stream(nc, stream, [f"bpout.{unique}.>"])
    proxy: TcpProxy = await tcp_proxy(*nats_address)  # type: ignore[operator]
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topics": [topic],
                   "stall_pause": "1s"},
        "sink": {"type": "jetstream", "servers": [f"nats://{proxy.address}"],
                 "subject": f"bpout.{unique}.x", "ack_timeout": "5s"},
    }])
    await produce(kafka_bootstrap, topic, BEFORE, data=padded)
    async with natsconn_process(file) as proc:
        await wait_stream_count(nc, stream, BEFORE, timeout=60)
        proxy.stall()
        # More than the pipeline's in-flight window: reads stop, then the pause.
        await produce(kafka_bootstrap, topic, FILL, start=BEFORE, data=padded)

        def paused() -> bool:
            return "paused 3 partition(s)" in proc.log()

        await wait_until(paused, 20, "the source pausing its partitions")
        rss_paused = proc.rss_bytes()
        lag_paused = await proc.metric("natsconn_source_lag", pipeline)
        await produce(kafka_bootstrap, topic, DURING, start=BEFORE + FILL, data=padded)
        lag = 0.0

        async def lag_grew() -> bool:
            nonlocal lag
            lag = await proc.metric("natsconn_source_lag", pipeline)
            return lag >= lag_paused + DURING

        await wait_until(lag_grew, 20, f"natsconn_source_lag grown by {DURING}", 0.5)
        await asyncio.sleep(2)  # time for a buffer to grow, if there were one
        rss_stalled = proc.rss_bytes()
        delivered_stalled = await stream_count(nc, stream)
        proxy.resume()
        total = BEFORE + FILL + DURING
        await wait_stream_count(nc, stream, total, timeout=120)

        async def lag_gone() -> bool:
            return await proc.metric("natsconn_source_lag", pipeline) == 0

        await wait_until(lag_gone, 20, "natsconn_source_lag back to 0", 0.5)
        assert "the pipeline has room again; resuming" in proc.log()
    grew = rss_stalled - rss_paused
    print(f"lag {lag_paused:.0f} -> {lag:.0f} while stalled; RSS {rss_paused / 2**20:.1f} -> "
          f"{rss_stalled / 2**20:.1f} MiB with {DURING} x 1 KiB waiting at the broker")
    assert delivered_stalled <= BEFORE + FILL, "messages went through a stalled sink"
    assert grew < 20 * 2**20, f"RSS grew {grew / 2**20:.1f} MiB while the partitions were paused"
    out = await read_stream(nc, stream)
    assert_exactly([seq_of(m.data) for m in out], total, f"stream {stream}")
