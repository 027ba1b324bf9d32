"""Issue 3's volume run, by hand (minutes on 2 cores, so not part of the suite):
200,000 messages JetStream → Kafka → JetStream, keys from a header, headers
byte for byte, order per key, none lost and none doubled.

    cd tests && ../.venv/bin/python -m integration.kafka.bench_roundtrip [N]

The same checks as ``test_kafka_roundtrip.py``; prints the time each leg took.
Needs ``scripts/services start nats kafka``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ..helpers import (
    assert_exactly,
    connect,
    create_stream,
    pipeline_file,
    publish_js,
    read_stream,
    run_in_process,
    seq_of,
    stream_count,
    wait_ready_in_process,
    wait_until,
)
from .kafka_helpers import create_topic, read_topic, topic_count
from .test_kafka_roundtrip import check_order, headers_of, roundtrip_pipelines


async def main(n: int) -> None:
    nats_url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    kafka = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    unique = uuid.uuid4().hex[:10]
    topic = f"rt-{unique}"
    nc = await connect(nats_url)
    try:
        await create_topic(kafka, topic, partitions=3)
        await create_stream(nc, f"RT_IN_{unique}", [f"rtin.{unique}.>"])
        t = time.perf_counter()
        await publish_js(nc, lambda i: f"rtin.{unique}.o{i % 7}", n, headers=headers_of)
        print(f"published {n} to JetStream in {time.perf_counter() - t:.1f}s")
        with tempfile.TemporaryDirectory() as tmp:
            file = pipeline_file(Path(tmp), roundtrip_pipelines(nats_url, kafka, unique))
            async with run_in_process(file, stop_timeout=30) as supervisor:
                await wait_ready_in_process(supervisor)
                start = time.perf_counter()
                marks: dict[str, float] = {}

                async def progressed() -> bool:
                    if "kafka" not in marks and await topic_count(kafka, topic) >= n:
                        marks["kafka"] = time.perf_counter() - start
                    if await stream_count(nc, f"RT_OUT_{unique}") >= n:
                        marks["jetstream"] = time.perf_counter() - start
                        return True
                    return False

                await wait_until(progressed, 900, f"{n} messages round trip", 0.5)
        k, j = marks.get("kafka", marks["jetstream"]), marks["jetstream"]
        print(f"JetStream -> Kafka: {n} in {k:.1f}s ({n / k:,.0f} msg/s); "
              f"-> back in JetStream after {j:.1f}s ({n / j:,.0f} msg/s end to end, "
              "both legs running at once, max_in_flight 1)")
        records = await read_topic(kafka, topic, n, timeout=300)
        assert_exactly([seq_of(r.value) for r in records], n, f"topic {topic}")
        for r in records:
            want = {k: v.encode() for k, v in headers_of(seq_of(r.value)).items()}
            assert dict(r.headers) == want and r.key == want["Key"], r
        check_order([(r.key.decode(), seq_of(r.value)) for r in records], f"topic {topic}")
        out = await read_stream(nc, f"RT_OUT_{unique}", timeout=300)
        assert_exactly([seq_of(m.data) for m in out], n, f"stream RT_OUT_{unique}")
        for m in out:
            hdrs = dict(m.headers or {})
            hdrs.pop("Nats-Msg-Id")
            hdrs.pop("Nats-Expected-Stream", None)
            assert hdrs == headers_of(seq_of(m.data)), hdrs
        check_order([((m.headers or {})["Key"], seq_of(m.data)) for m in out], "stream RT_OUT")
        print(f"checked: {n} in Kafka and {n} back in JetStream, each once; keys and "
              "headers byte for byte; order per key kept in both")
        for name in (f"RT_IN_{unique}", f"RT_OUT_{unique}"):
            await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
