"""Issue 3: JetStream → Kafka → JetStream in one natsconn, with keys from a header,
headers byte for byte and per-key order, nothing lost and nothing doubled.

Two pipelines run side by side in this process: ``jetstream → kafka`` keyed by
the ``Key`` header, and ``kafka → jetstream`` with ``Nats-Msg-Id`` from the
Kafka offsets. One write at a time per pipeline (``max_in_flight: 1``) is the
documented condition for per-key order. ``N`` is kept small for the test suite;
``bench_roundtrip.py`` beside this file runs the same flow with 200,000.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from ..helpers import (
    ODD_HEADERS,
    assert_exactly,
    create_stream,
    pipeline_file,
    publish_js,
    read_stream,
    run_in_process,
    seq_of,
    wait_ready_in_process,
    wait_stream_count,
)
from .kafka_helpers import create_topic, read_topic

pytestmark = pytest.mark.integration

N = 20_000
KEYS = 50


def headers_of(seq: int) -> dict[str, str]:
    return {"Key": f"key-{seq % KEYS}", "X-Seq": str(seq), **ODD_HEADERS}


def roundtrip_pipelines(nats_url: str, kafka: str, unique: str) -> list[dict[str, Any]]:
    flow: dict[str, Any] = {"batch": {"max_messages": 1000, "max_wait": "20ms"},
                            "max_in_flight": 1}
    return [
        {
            "name": f"rt-to-kafka-{unique}",
            "source": {"type": "jetstream", "servers": [nats_url], "stream": f"RT_IN_{unique}",
                       "durable": f"rt-{unique}"},
            "sink": {"type": "kafka", "bootstrap_servers": [kafka], "topic": f"rt-{unique}",
                     "key": "{header[Key]}"},
            **flow,
        },
        {
            "name": f"rt-from-kafka-{unique}",
            "source": {"type": "kafka", "bootstrap_servers": [kafka],
                       "topics": [f"rt-{unique}"]},
            "sink": {"type": "jetstream", "servers": [nats_url],
                     "subject": f"rtout.{unique}.x", "stream": f"RT_OUT_{unique}",
                     "stream_subjects": [f"rtout.{unique}.>"]},
            **flow,
        },
    ]


def check_order(pairs: list[tuple[str, int]], where: str) -> None:
    """Per key, the sequence numbers come in increasing order."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for key, seq in pairs:
        by_key[key].append(seq)
    bad = {k: s for k, s in by_key.items() if s != sorted(s)}
    assert not bad, f"{where}: per-key order broken for {len(bad)} keys, e.g. {next(iter(bad))}"


async def test_jetstream_kafka_jetstream_round_trip(
        nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    topic = f"rt-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    await create_stream(nc, f"RT_IN_{unique}", [f"rtin.{unique}.>"])
    await publish_js(nc, lambda i: f"rtin.{unique}.o{i % 7}", N, headers=headers_of)
    file = pipeline_file(tmp_path, roundtrip_pipelines(nats_url, kafka_bootstrap, unique))
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await wait_stream_count(nc, f"RT_OUT_{unique}", N, timeout=120)

    # The Kafka leg: every record keyed by its Key header, byte for byte, in order per key.
    records = await read_topic(kafka_bootstrap, topic, N)
    assert_exactly([seq_of(r.value) for r in records], N, f"topic {topic}")
    for r in records:
        hdrs = dict(r.headers)
        assert r.key == hdrs["Key"], f"record key {r.key!r} is not its Key header {hdrs}"
        expected = {k: v.encode() for k, v in headers_of(seq_of(r.value)).items()}
        assert hdrs == expected, f"Kafka headers {hdrs!r}, expected {expected!r}"
    check_order([(r.key.decode(), seq_of(r.value)) for r in records], f"topic {topic}")

    # Back in JetStream: each message once (Nats-Msg-Id from the offsets), headers
    # exactly as published plus only the JetStream sink's own, order per key kept.
    out = await read_stream(nc, f"RT_OUT_{unique}")
    assert_exactly([seq_of(m.data) for m in out], N, f"stream RT_OUT_{unique}")
    for m in out:
        hdrs = dict(m.headers or {})
        msg_id = hdrs.pop("Nats-Msg-Id", None)
        hdrs.pop("Nats-Expected-Stream", None)  # set by the jetstream sink's `stream`
        assert msg_id is not None and msg_id.startswith(f"{topic}/"), hdrs
        assert hdrs == headers_of(seq_of(m.data)), f"headers {hdrs!r} changed"
    check_order([((m.headers or {})["Key"], seq_of(m.data)) for m in out], "stream RT_OUT")
