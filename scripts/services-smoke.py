#!/usr/bin/env python3
"""Smoke-check the local services started by scripts/services.

Usage:
    eval "$(scripts/services env)"
    .venv/bin/python scripts/services-smoke.py [nats kafka redis postgres]

For each service: write one message and read it back. Prints one line per check;
exits non-zero on the first failure. Needs nats-py, aiokafka, redis, asyncpg.
Everything it creates is namespaced with a random token and removed again, so it
is safe to run while other tests use the same servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid

TOKEN = uuid.uuid4().hex[:12]


async def check_nats() -> str:
    import nats

    nc = await nats.connect(os.environ["NATS_URL"], connect_timeout=5)
    stream = f"NATSCONN_SMOKE_{TOKEN}"
    subject = f"natsconn_smoke.{TOKEN}"
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject], max_msgs=10)
        try:
            ack = await js.publish(subject, TOKEN.encode())
            sub = await js.pull_subscribe(subject, durable=None, stream=stream)
            msgs = await sub.fetch(1, timeout=5)
            assert msgs[0].data == TOKEN.encode(), msgs[0].data
            await msgs[0].ack()
        finally:
            await js.delete_stream(stream)
        return f"JetStream publish/fetch on {subject} (seq {ack.seq})"
    finally:
        await nc.close()


async def _kafka_roundtrip(bootstrap: str, topic: str, **sec) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **sec)
    await producer.start()
    try:
        await producer.send_and_wait(topic, TOKEN.encode(), key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"smoke-{TOKEN}",
        auto_offset_reset="earliest",
        **sec,
    )
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), timeout=30)
        assert msg.value == TOKEN.encode(), msg.value
        await consumer.commit()
    finally:
        await consumer.stop()


async def check_kafka() -> str:
    from aiokafka.admin import AIOKafkaAdminClient

    topics = [f"natsconn-smoke-{TOKEN}"]
    await _kafka_roundtrip(os.environ["KAFKA_BOOTSTRAP"], topics[0])
    mechs = []
    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"):
        topic = f"natsconn-smoke-{TOKEN}-{mech.lower()}"
        topics.append(topic)
        await _kafka_roundtrip(
            os.environ["KAFKA_SASL_BOOTSTRAP"],
            topic,
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism=mech,
            sasl_plain_username="natsconn",
            sasl_plain_password="natsconn-secret",
        )
        mechs.append(mech)
    admin = AIOKafkaAdminClient(bootstrap_servers=os.environ["KAFKA_BOOTSTRAP"])
    await admin.start()
    try:
        await admin.delete_topics(topics)
        with contextlib.suppress(Exception):
            await admin.delete_consumer_groups([f"smoke-{TOKEN}"])
    finally:
        await admin.close()
    return "PLAINTEXT + SASL " + ",".join(mechs) + " produce/consume"


async def check_redis() -> str:
    import redis.asyncio as redis

    r = redis.from_url(os.environ["REDIS_URL"])
    try:
        key = f"natsconn:smoke:{TOKEN}"
        try:
            mid = await r.xadd(key, {"token": TOKEN})
            got = await r.xrange(key, min=mid, max=mid)
            assert got and got[0][1][b"token"] == TOKEN.encode(), got
        finally:
            await r.delete(key)
        aof = (await r.config_get("appendonly"))["appendonly"]
        return f"stream entry {mid.decode()} (appendonly={aof})"
    finally:
        await r.aclose()


async def check_postgres() -> str:
    import asyncpg

    conn = await asyncpg.connect(os.environ["POSTGRES_DSN"], timeout=10)
    try:
        await conn.execute("CREATE TEMP TABLE natsconn_smoke (token text)")
        await conn.execute("INSERT INTO natsconn_smoke (token) VALUES ($1)", TOKEN)
        got = await conn.fetchval("SELECT token FROM natsconn_smoke WHERE token = $1", TOKEN)
        assert got == TOKEN, got
        version = await conn.fetchval("SHOW server_version")
        return f"insert/select ok (server {version})"
    finally:
        await conn.close()


CHECKS = {
    "nats": check_nats,
    "kafka": check_kafka,
    "redis": check_redis,
    "postgres": check_postgres,
}


async def main(names: list[str]) -> int:
    for name in names or list(CHECKS):
        t = time.monotonic()
        try:
            detail = await CHECKS[name]()
        except Exception as exc:
            print(f"[smoke] {name}: FAILED: {type(exc).__name__}: {exc}")
            return 1
        print(f"[smoke] {name}: ok in {time.monotonic() - t:.2f}s - {detail}")
    return 0


if __name__ == "__main__":
    # aiokafka logs topic auto-creation chatter as errors
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(sys.argv[1:])))
