"""Issue 2: a poison message lands on the dead-letter subject with its reason
while the rest flow on.

Poison found two ways: by a transform (``json_validate`` rejecting non-JSON,
sink JetStream), and by the sink itself (its subject template needs a header
the message lacks, sink core NATS). Both run in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from .helpers import (
    ODD_HEADERS,
    Collector,
    ack_floor,
    assert_exactly,
    assert_headers,
    create_stream,
    local_metric,
    payload,
    pipeline_file,
    publish_js,
    read_stream,
    run_in_process,
    seq_of,
    wait_consumer_drained,
    wait_ready_in_process,
    wait_stream_count,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

N = 1_000
POISON = {i for i in range(N) if i % 100 == 7}  # 10 of them, spread over batches


def _check_letters(letters: Collector, pipeline: str, stream: str, subject: str,
                   reason: str, data: dict[int, bytes]) -> None:
    """Each poison message once on the DLQ subject, with the Natsconn-* headers
    saying why and where from, its own data and headers kept."""
    by_seq: dict[int, Any] = {}
    for m in letters.messages:
        h = m.headers or {}
        source_id = h.get("Natsconn-Source-Id", "")
        assert source_id.startswith(f"{stream}:"), h
        by_seq[int(source_id.split(":")[1]) - 1] = m  # stream sequences start at 1
        assert reason in h.get("Natsconn-Error", ""), h
        assert h.get("Natsconn-Error-Kind") == "rejected", h
        assert h.get("Natsconn-Original-Subject") == subject, h
        assert h.get("Natsconn-Pipeline") == pipeline, h
        assert h.get("Natsconn-Attempts", "").isdigit(), h
    assert len(letters) == len(POISON) and set(by_seq) == POISON, (
        f"dead letters for {sorted(by_seq)}, expected {sorted(POISON)}")
    for seq, m in by_seq.items():
        assert m.data == data[seq]
    assert_headers(letters.messages, ODD_HEADERS, "dead letters")


async def test_transform_poison_goes_to_dead_letter_subject(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    source, target, durable = f"DLQ_IN_{unique}", f"DLQ_OUT_{unique}", f"dlq-{unique}"
    pipeline, dlq = f"dlq-{unique}", f"dlq.{unique}"
    await create_stream(nc, source, [f"dlqin.{unique}.>"])
    await create_stream(nc, target, [f"dlqout.{unique}.>"])
    data = {i: (b"not json %d" % i if i in POISON else payload(i)) for i in range(N)}
    letters = await Collector.subscribe(nc, dlq)
    await publish_js(nc, f"dlqin.{unique}.x", N, data=data.__getitem__, headers=ODD_HEADERS)
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                   "durable": durable},
        "transforms": [{"type": "json_validate"}],
        "sink": {"type": "jetstream", "servers": [nats_url],
                 "subject": f"dlqout.{unique}.x"},
        "dead_letter": {"type": "nats", "servers": [nats_url], "subject": dlq},
        "batch": {"max_messages": 50},
    }])
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await wait_consumer_drained(nc, source, durable, timeout=30)
        await wait_stream_count(nc, target, N - len(POISON), timeout=10)
        await letters.wait_for(len(POISON), timeout=10)
    _check_letters(letters, pipeline, source, f"dlqin.{unique}.x", "not JSON", data)
    good = await read_stream(nc, target)
    assert_exactly([seq_of(m.data) for m in good]
                   + sorted(POISON), N, f"stream {target} plus the dead letters")
    assert len(good) == N - len(POISON)
    assert local_metric("natsconn_dead_lettered_total", pipeline) == len(POISON)
    assert local_metric("natsconn_messages_out_total", pipeline) == N - len(POISON)
    # the poison was acked too: never redelivered
    assert await ack_floor(nc, source, durable) == N


async def test_sink_rejection_goes_to_dead_letter_subject(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    source, durable = f"DLS_IN_{unique}", f"dls-{unique}"
    pipeline, dlq = f"dls-{unique}", f"dls.{unique}"
    await create_stream(nc, source, [f"dlsin.{unique}.>"])
    data = {i: payload(i) for i in range(N)}

    def headers(i: int) -> dict[str, str]:
        return ODD_HEADERS if i in POISON else {**ODD_HEADERS, "Route": f"r{i % 3}"}

    letters = await Collector.subscribe(nc, dlq)
    out = await Collector.subscribe(nc, f"dlsout.{unique}.>")
    await publish_js(nc, f"dlsin.{unique}.x", N, headers=headers)
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                   "durable": durable},
        "sink": {"type": "nats", "servers": [nats_url],
                 "subject": f"dlsout.{unique}.{{header[Route]}}"},
        "dead_letter": {"type": "nats", "servers": [nats_url], "subject": dlq},
        "batch": {"max_messages": 50},
    }])
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await wait_consumer_drained(nc, source, durable, timeout=30)
        await out.wait_for(N - len(POISON), timeout=10)
        await letters.wait_for(len(POISON), timeout=10)
    _check_letters(letters, pipeline, source, f"dlsin.{unique}.x", "header 'Route'", data)
    assert_exactly(out.seqs() + sorted(POISON), N, "core subscriber plus the dead letters")
    assert {m.subject for m in out.messages} == {f"dlsout.{unique}.r{k}" for k in range(3)}
    assert local_metric("natsconn_dead_lettered_total", pipeline) == len(POISON)
