"""Issue 13: the ack semantics of ``split`` and ``filter`` against a real
nats-server, through a ``kill -9``. A source message split into many is
acknowledged only once every element is written: killed half way through its
elements, natsconn gets it again from JetStream after the restart and writes
every element (deduplicated by ``<source id>/<index>``). Messages a filter drops
are acknowledged with their batch: nothing is left pending or redelivered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from .helpers import (
    consumer_info,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    stream_count,
    wait_consumer_drained,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

ELEMENTS = 400  # per source message


def redeliveries(info: Any) -> int:
    """Deliveries beyond the first, ever: the consumer's delivery count less the
    stream sequences it delivered (num_redelivered counts only those still
    unacknowledged)."""
    return int(info.delivered.consumer_seq - info.delivered.stream_seq)
SOURCES = 5


def _array(seq: int) -> bytes:
    return json.dumps([{"seq": seq, "i": i} for i in range(ELEMENTS)]).encode()


def _spec(nats_url: str, src: str, dst: str, unique: str, transforms: list[dict[str, Any]]
          ) -> dict[str, Any]:
    return {
        "name": "process",
        "source": {"type": "jetstream", "servers": [nats_url], "stream": src,
                   "durable": "d-process", "ack_wait": "2s"},
        "transforms": transforms,
        "sink": {"type": "jetstream", "servers": [nats_url], "stream": dst,
                 "subject": f"pc.out.{unique}"},
        # Small, one-at-a-time writes: a source message's elements take many writes.
        "batch": {"max_messages": 5, "max_wait": "5ms"}, "max_in_flight": 1,
        "in_progress_interval": "1s",
    }


async def test_a_kill_half_way_through_a_split_redelivers_the_source_message(
        tmp_path: Path, nc: NATS, nats_url: str, unique: str) -> None:
    src, dst = f"PC_IN_{unique}", f"PC_OUT_{unique}"
    await create_stream(nc, src, [f"pc.in.{unique}"])
    await create_stream(nc, dst, [f"pc.out.{unique}"])
    await publish_js(nc, f"pc.in.{unique}", SOURCES, data=_array)
    file = pipeline_file(tmp_path, [_spec(nats_url, src, dst, unique, [{"type": "split"}])])
    async with natsconn_process(file, log_name="run1.log") as proc:
        async def some_elements() -> bool:
            return await stream_count(nc, dst) >= ELEMENTS // 4

        await wait_until(some_elements, 60, "a quarter of the first message's elements",
                         interval=0.01)
        await proc.kill()
    written = await stream_count(nc, dst)
    assert written < SOURCES * ELEMENTS, "the kill came too late: everything was written"
    info = await consumer_info(nc, src, "d-process")
    acked = info.ack_floor.stream_seq if info.ack_floor else 0
    assert acked * ELEMENTS <= written, "a source message was acked before its elements"
    assert acked < SOURCES

    async with natsconn_process(file, log_name="run2.log"):
        await wait_consumer_drained(nc, src, "d-process", 120)
    info = await consumer_info(nc, src, "d-process")
    assert redeliveries(info) >= 1, "the half-written source message came again"
    got = [json.loads(m.data) for m in await read_stream(nc, dst)]
    pairs = [(e["seq"], e["i"]) for e in got]
    expected = {(s, i) for s in range(SOURCES) for i in range(ELEMENTS)}
    assert set(pairs) == expected, f"missing {len(expected - set(pairs))} element(s)"
    assert len(pairs) == len(expected), "an element was written twice despite its id"


async def test_filtered_messages_are_acknowledged_with_their_batch(
        tmp_path: Path, nc: NATS, nats_url: str, unique: str) -> None:
    src, dst, n = f"PF_IN_{unique}", f"PF_OUT_{unique}", 2_000
    await create_stream(nc, src, [f"pc.in.{unique}"])
    await create_stream(nc, dst, [f"pc.out.{unique}"])
    await publish_js(nc, f"pc.in.{unique}", n)
    keep = [{"type": "filter", "when": "data.seq % 10 == 0"}]
    file = pipeline_file(tmp_path, [_spec(nats_url, src, dst, unique, keep)])
    async with natsconn_process(file) as proc:
        await wait_consumer_drained(nc, src, "d-process", 60)
        filtered = (await proc.metrics()).get(("natsconn_filtered_total", "process"), 0.0)
    info = await consumer_info(nc, src, "d-process")
    assert redeliveries(info) == 0 and info.num_ack_pending == 0
    seqs = sorted(json.loads(m.data)["seq"] for m in await read_stream(nc, dst))
    assert seqs == list(range(0, n, 10))
    assert filtered == n - n // 10
