"""Issue 14, KV: puts and deletes into a bucket → ``nats_kv`` source → a Kafka
compacted topic → ``kafka`` source → ``nats_kv`` sink on a second bucket, with a
``kill -9`` of each leg's ``natsconn run`` in the middle and a restart.

Checked at the end: the buckets are equal key by key (values and deletions);
no revision was skipped on the first leg (every revision of the source bucket
is in the topic, with its key, operation and value) nor on the second (each
key's changes in the second bucket contain the first bucket's, in order).

``NATSCONN_KV_PUTS`` sets the number of puts (default 10,000 for CI; the
issue's full run is ``NATSCONN_KV_PUTS=100000``), with one delete per 100 puts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from .helpers import (
    NatsconnProcess,
    ack_floor,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    stream_count,
    wait_consumer_drained,
    wait_until,
)
from .kafka.kafka_helpers import read_topic, topic_count, wait_topic

pytestmark = pytest.mark.integration

PUTS = int(os.environ.get("NATSCONN_KV_PUTS", "10000"))
DELETES = PUTS // 100
TOTAL = PUTS + DELETES
KILL_AT = TOTAL // 4
PARTITIONS = 3
FLOW: dict[str, Any] = {"batch": {"max_messages": 100, "max_wait": "10ms"}, "max_in_flight": 1}


def _key(i: int) -> str:
    return f"k.{i % (PUTS // 2)}"  # every key put twice, the second time a new value


def _value(i: int) -> bytes:
    return b"value-%d" % i


@pytest.fixture
async def buckets(nc: NATS, unique: str) -> AsyncIterator[tuple[str, str]]:
    src, dst = f"kvsrc_{unique}", f"kvdst_{unique}"
    await nc.jetstream().create_key_value(bucket=src, history=5)
    yield src, dst
    for name in (src, dst):
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_key_value(name)


async def _compacted_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1, topic_configs={
            "cleanup.policy": "compact"})])
    finally:
        await admin.close()
    await wait_topic(bootstrap, name, PARTITIONS)


def _state(messages: list[Msg], prefix: str) -> dict[str, bytes | None]:
    """Key -> latest value (None: deleted or purged), from a KV stream's messages."""
    out: dict[str, bytes | None] = {}
    for m in messages:
        op = (m.headers or {}).get("KV-Operation")
        out[m.subject[len(prefix):]] = None if op in ("DEL", "PURGE") else m.data
    return out


def _changes(messages: list[Msg], prefix: str) -> dict[str, list[bytes | None]]:
    """Key -> its changes in stream order (None for a delete)."""
    out: dict[str, list[bytes | None]] = {}
    for m in messages:
        op = (m.headers or {}).get("KV-Operation")
        out.setdefault(m.subject[len(prefix):], []).append(
            None if op in ("DEL", "PURGE") else m.data)
    return out


def _contains_in_order(whole: list[bytes | None], part: list[bytes | None]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


async def _kill_when(proc: NatsconnProcess, through: Callable[[], Awaitable[int]],
                     what: str) -> int:
    """SIGKILL ``proc`` once ``through()`` reaches KILL_AT; the count at the kill,
    which must be short of TOTAL (the kill was mid-leg)."""
    count = 0

    async def far_enough() -> bool:
        nonlocal count
        count = await through()
        return count >= KILL_AT

    await wait_until(far_enough, 60, f"{KILL_AT} changes through {what}", 0.02)
    proc.signal(signal.SIGKILL)
    assert await proc.wait_exit(10) == -signal.SIGKILL
    count = await through()
    assert count < TOTAL, f"{what} finished ({count}) before it could be killed mid-leg"
    return count


async def test_kv_to_compacted_topic_to_kv_with_kill_9_in_each_leg(
        nc: NATS, nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path,
        buckets: tuple[str, str]) -> None:
    src, dst = buckets
    topic, durable = f"kv-mirror-{unique}", f"kv-{unique}"
    started = time.monotonic()
    await _compacted_topic(kafka_bootstrap, topic)
    await publish_js(nc, lambda i: f"$KV.{src}.{_key(i)}", PUTS, data=_value)
    # Deletes of every 50th key, after both of its puts.
    await publish_js(nc, lambda j: f"$KV.{src}.{_key(j * 50)}", DELETES,
                     headers={"KV-Operation": "DEL"}, data=lambda _j: b"")
    src_stream, dst_stream = f"KV_{src}", f"KV_{dst}"
    assert await stream_count(nc, src_stream) == TOTAL
    loaded = time.monotonic()

    leg1 = pipeline_file(tmp_path, [{
        "name": f"kv-to-kafka-{unique}",
        "source": {"type": "nats_kv", "servers": [nats_url], "bucket": src,
                   "durable": durable, "include_history": True, "ack_wait": "2s"},
        "sink": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topic": topic},
        **FLOW,
    }], name="leg1.yaml")
    leg2 = pipeline_file(tmp_path, [{
        "name": f"kafka-to-kv-{unique}",
        "source": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topics": [topic],
                   "commit_interval": "200ms", "session_timeout": "6s",
                   "heartbeat_interval": "1s"},
        "sink": {"type": "nats_kv", "servers": [nats_url], "bucket": dst,
                 "create_bucket": True, "history": 10, "empty_is_delete": True},
        **FLOW,
    }], name="leg2.yaml")

    async def acked_on_leg1() -> int:
        return await ack_floor(nc, src_stream, durable)

    async def in_dst() -> int:
        try:
            return await stream_count(nc, dst_stream)
        except Exception:
            return 0

    async with natsconn_process(leg1, log_name="leg1-run1.log") as p:
        killed1 = await _kill_when(p, acked_on_leg1, "leg 1 (nats_kv -> kafka)")
    async with natsconn_process(leg1, log_name="leg1-run2.log"), \
            natsconn_process(leg2, log_name="leg2-run1.log") as p2:
        killed2 = await _kill_when(p2, in_dst, "leg 2 (kafka -> nats_kv)")
        async with natsconn_process(leg2, log_name="leg2-run2.log"):
            await wait_consumer_drained(nc, src_stream, durable, timeout=60)
            in_topic = await topic_count(kafka_bootstrap, topic)
            want = _state(await read_stream(nc, src_stream), f"$KV.{src}.")

            async def equal() -> bool:
                return _state(await read_stream(nc, dst_stream), f"$KV.{dst}.") == want

            await wait_until(equal, 60, f"bucket {dst} equal to {src}", 0.5)
    finished = time.monotonic()

    # The buckets, key by key: values and deletions.
    src_msgs = await read_stream(nc, src_stream)
    dst_msgs = await read_stream(nc, dst_stream)
    src_state, dst_state = _state(src_msgs, f"$KV.{src}."), _state(dst_msgs, f"$KV.{dst}.")
    assert src_state == dst_state
    deleted = [k for k, v in src_state.items() if v is None]
    assert len(src_state) == PUTS // 2 and len(deleted) == DELETES
    kv = await nc.jetstream().key_value(dst)
    assert (await kv.get(_key(1))).value == _value(PUTS // 2 + 1)  # through the KV API too

    # Leg 1 skipped no revision: each one is in the topic with its key, operation and value.
    records = await read_topic(kafka_bootstrap, topic, in_topic)
    by_revision: dict[int, tuple[bytes, str, bytes]] = {}
    for r in records:
        headers = {k: v.decode() for k, v in r.headers}
        rev = int(headers["KV-Revision"])
        seen = (r.key, headers["KV-Operation"], r.value)
        assert by_revision.setdefault(rev, seen) == seen, f"revision {rev} changed"
    expected = {int(m.metadata.sequence.stream): (
        m.subject[len(f"$KV.{src}."):].encode(),
        (m.headers or {}).get("KV-Operation", "PUT"), m.data) for m in src_msgs}
    missing = sorted(set(expected) - set(by_revision))
    assert not missing, f"{len(missing)} revisions never reached the topic: {missing[:10]}"
    assert by_revision == expected

    # Leg 2 skipped none either: each key's changes in the second bucket hold the
    # first bucket's, in order (a replay after the kill may repeat some).
    src_changes = _changes(src_msgs, f"$KV.{src}.")
    dst_changes = _changes(dst_msgs, f"$KV.{dst}.")
    bad = [k for k, ch in src_changes.items()
           if not _contains_in_order(dst_changes.get(k, []), ch)]
    assert not bad, (f"{len(bad)} keys lost changes, e.g. {bad[0]}: {src_changes[bad[0]]} "
                     f"-> {dst_changes.get(bad[0])}")
    print(f"{PUTS} puts + {DELETES} deletes: loaded in {loaded - started:.1f}s; leg 1 "
          f"killed at {killed1} confirmed, leg 2 killed at {killed2} written; "
          f"{len(records)} records in the topic for {TOTAL} revisions, "
          f"{len(dst_msgs)} changes in {dst}; mirrored in {finished - loaded:.1f}s")
