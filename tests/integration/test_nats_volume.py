"""Issue 2: JetStream → core NATS and core NATS → JetStream carry 100,000
messages with none lost and headers intact (``natsconn run`` as a process)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from .helpers import (
    ODD_HEADERS,
    Collector,
    assert_exactly,
    assert_headers,
    consumer_info,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_core,
    publish_js,
    read_stream,
    seq_of,
    wait_stream_count,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

N = 100_000


async def test_jetstream_to_core_nats_100k(nc: NATS, nats_url: str, unique: str,
                                          tmp_path: Path) -> None:
    stream, durable = f"VOL_IN_{unique}", f"vol-{unique}"
    await create_stream(nc, stream, [f"volin.{unique}.>"])
    await publish_js(nc, f"volin.{unique}.orders", N, headers=ODD_HEADERS)
    out = await Collector.subscribe(nc, f"volout.{unique}.>")
    file = pipeline_file(tmp_path, [{
        "name": f"js-to-core-{unique}",
        "source": {"type": "jetstream", "servers": [nats_url], "stream": stream,
                   "durable": durable},
        "sink": {"type": "nats", "servers": [nats_url],
                 "subject": f"volout.{unique}.{{subject[2]}}"},
    }])
    async with natsconn_process(file) as proc:
        await out.wait_for(N, timeout=90)
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0, proc.log()

    assert_exactly(out.seqs(), N, "core NATS subscriber")
    assert {m.subject for m in out.messages} == {f"volout.{unique}.orders"}
    assert_headers(out.messages, ODD_HEADERS, "core NATS subscriber")
    info = await consumer_info(nc, stream, durable)
    assert (info.num_pending, info.num_ack_pending) == (0, 0), info


async def test_core_nats_to_jetstream_100k(nc: NATS, nats_url: str, unique: str,
                                          tmp_path: Path) -> None:
    target = f"VOL_OUT_{unique}"
    file = pipeline_file(tmp_path, [{
        "name": f"core-to-js-{unique}",
        "source": {"type": "nats", "servers": [nats_url], "subjects": [f"volin.{unique}.>"]},
        "sink": {"type": "jetstream", "servers": [nats_url],
                 "subject": f"volout.{unique}.{{subject[2]}}",
                 "stream": target, "stream_subjects": [f"volout.{unique}.>"]},
    }])
    async with natsconn_process(file) as proc:
        # Core NATS keeps nothing for absent subscribers: publish only once
        # natsconn reports itself ready (subscribed).
        await publish_core(nc, f"volin.{unique}.orders", N, headers=ODD_HEADERS)
        await wait_stream_count(nc, target, N, timeout=90)
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0, proc.log()
        assert "dropped" not in proc.log(), proc.log()

    got = await read_stream(nc, target)
    assert_exactly([seq_of(m.data) for m in got], N, f"stream {target}")
    assert {m.subject for m in got} == {f"volout.{unique}.orders"}
    assert_headers(got, ODD_HEADERS, f"stream {target}")
