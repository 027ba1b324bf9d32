"""The two ends of each pipeline pair in the fault matrix.

A source leg puts N messages (payloads ``{"seq": i}``) where natsconn reads;
a sink leg tells where natsconn writes (through a given address: the fault
proxy's) and reads back what arrived, as sequence numbers. Names carry a
per-cell scope so cells never see each other's data.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import asyncpg
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from integration.helpers import payload, publish_js, read_stream, seq_of
from nats.aio.client import Client as NATS

from . import private
from .private import KAFKA_PORT, NATS_PORT, PG_PORT, REDIS_PORT

OUTBOX_DDL = ('CREATE TABLE "{table}" (id bigserial PRIMARY KEY, data bytea, subject text, '
              'key bytea, headers jsonb, "timestamp" timestamptz DEFAULT now(), '
              'claimed_until timestamptz)')


# ---------------------------------------------------------------------- sources


@dataclass
class SourceLeg:
    label: ClassVar[str] = ""
    gives_ids: ClassVar[bool] = True    # a stable Message.id (docs/delivery.md)
    scope: str
    options: dict[str, Any] = field(default_factory=dict)

    async def produce(self, n: int, first: int = 0) -> None:
        """Put sequence numbers ``first .. first + n - 1`` at the source; the first
        call (``first == 0``) also creates what the source reads from."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        pass


class JetStreamSource(SourceLeg):
    label = "JetStream"

    async def produce(self, n: int, first: int = 0) -> None:
        nc = await private.nats_client()
        try:
            if first == 0:
                await nc.jetstream().add_stream(name=f"RIN_{self.scope}",
                                                subjects=[f"rin.{self.scope}"])
            await publish_js(nc, f"rin.{self.scope}", n, start=first)
        finally:
            await nc.close()
        self.options = {"type": "jetstream", **private.nats_options(),
                        "stream": f"RIN_{self.scope}", "ack_wait": "5s"}

    async def cleanup(self) -> None:
        nc = await private.nats_client()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(f"RIN_{self.scope}")
        await nc.close()


class KafkaSource(SourceLeg):
    label = "Kafka"

    async def produce(self, n: int, first: int = 0) -> None:
        topic = f"rin-{self.scope}"
        if first == 0:
            admin = private.kafka_admin()
            await admin.start()
            try:
                await admin.create_topics([NewTopic(topic, 3, 1)])
            finally:
                await admin.close()
        producer = private.kafka_producer()
        await producer.start()
        try:
            futures = [await producer.send(topic, payload(i)) for i in range(first, first + n)]
            for f in futures:
                await f
        finally:
            await producer.stop()
        self.options = {"type": "kafka", **private.kafka_options(), "topics": [topic]}

    async def cleanup(self) -> None:
        admin = private.kafka_admin()
        await admin.start()
        with contextlib.suppress(Exception):
            await admin.delete_topics([f"rin-{self.scope}"])
        await admin.close()


class RedisStreamSource(SourceLeg):
    label = "Redis stream"

    async def produce(self, n: int, first: int = 0) -> None:
        r = private.redis_client()
        try:
            pipe = r.pipeline(transaction=False)
            for i in range(first, first + n):
                pipe.xadd(f"rin:{self.scope}", {"data": payload(i)})
            await pipe.execute()
        finally:
            await r.aclose()
        self.options = {"type": "redis_stream", **private.redis_options(),
                        "streams": [f"rin:{self.scope}"], "min_idle_time": "5s",
                        "claim_interval": "1s"}

    async def cleanup(self) -> None:
        r = private.redis_client()
        await r.delete(f"rin:{self.scope}")
        await r.aclose()


class RedisListSource(SourceLeg):
    label = "Redis list"
    gives_ids = False  # list elements have no identity: no sink can deduplicate them

    async def produce(self, n: int, first: int = 0) -> None:
        r = private.redis_client()
        try:
            for start in range(first, first + n, 1000):
                await r.lpush(f"rin:{self.scope}:q", *[
                    payload(i) for i in range(start, min(first + n, start + 1000))])
        finally:
            await r.aclose()
        self.options = {"type": "redis_list", **private.redis_options(),
                        "key": f"rin:{self.scope}:q", "consumer": "reliability",
                        "lease": "5s", "claim_interval": "1s"}

    async def cleanup(self) -> None:
        r = private.redis_client()
        keys = [k async for k in r.scan_iter(match=f"rin:{self.scope}:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


class OutboxSource(SourceLeg):
    label = "PostgreSQL outbox"

    async def produce(self, n: int, first: int = 0) -> None:
        table = f"rbox_{self.scope}"
        conn = await private.pg_connect()
        try:
            if first == 0:
                await conn.execute(OUTBOX_DDL.format(table=table))
            await conn.copy_records_to_table(
                table, records=[(payload(i),) for i in range(first, first + n)],
                columns=["data"])
        finally:
            await conn.close()
        self.options = {"type": "postgres_outbox", **private.postgres_options(),
                        "table": table, "lease": "5s", "poll_interval": "200ms"}

    async def cleanup(self) -> None:
        conn = await private.pg_connect()
        await conn.execute(f'DROP TABLE IF EXISTS "rbox_{self.scope}"')
        await conn.close()


# ---------------------------------------------------------------------- sinks


@dataclass
class SinkLeg:
    label: ClassVar[str] = ""
    service: ClassVar[str] = ""         # scripts/services name, for the restart fault
    port: ClassVar[int] = 0             # the server's port, for the proxy
    dedupes: ClassVar[bool] = False     # deduplicates by the source's id (docs/delivery.md)
    scope: str

    def options(self, address: str) -> dict[str, Any]:
        raise NotImplementedError

    async def count(self) -> int:
        """Records at the far side (cheap; for pacing the faults)."""
        raise NotImplementedError

    async def seqs(self) -> list[int]:
        """Every record's sequence number, duplicates included."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        pass


class JetStreamSink(SinkLeg):
    label, service, port, dedupes = "JetStream", "nats-tls", NATS_PORT, True

    def options(self, address: str) -> dict[str, Any]:
        return {"type": "jetstream", **private.nats_options(address),
                "subject": f"rout.{self.scope}", "stream": f"ROUT_{self.scope}",
                "stream_subjects": [f"rout.{self.scope}"]}

    async def _nc(self) -> NATS:
        return await private.nats_client()

    async def count(self) -> int:
        nc = await self._nc()
        try:
            info = await nc.jetstream().stream_info(f"ROUT_{self.scope}")
            return int(info.state.messages)
        except Exception:
            return 0
        finally:
            await nc.close()

    async def seqs(self) -> list[int]:
        nc = await self._nc()
        try:
            return [seq_of(m.data) for m in await read_stream(nc, f"ROUT_{self.scope}", 120)]
        finally:
            await nc.close()

    async def cleanup(self) -> None:
        nc = await self._nc()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(f"ROUT_{self.scope}")
        await nc.close()


class KafkaSink(SinkLeg):
    label, service, port = "Kafka", "kafka-tls", KAFKA_PORT

    @property
    def topic(self) -> str:
        return f"rout-{self.scope}"

    def options(self, address: str) -> dict[str, Any]:
        return {"type": "kafka", **private.kafka_options(address), "topic": self.topic}

    async def _partitions(self) -> list[TopicPartition]:
        admin = private.kafka_admin()
        await admin.start()
        try:
            described = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        return [TopicPartition(self.topic, p["partition"]) for d in described
                for p in d.get("partitions") or []]

    async def count(self) -> int:
        parts = await self._partitions()
        if not parts:
            return 0
        consumer = private.kafka_consumer()
        await consumer.start()
        try:
            ends = await consumer.end_offsets(parts)
            return int(sum(ends.values()))
        finally:
            await consumer.stop()

    async def seqs(self) -> list[int]:
        parts = await self._partitions()
        if not parts:
            return []
        consumer = private.kafka_consumer()
        await consumer.start()
        try:
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            ends = await consumer.end_offsets(parts)
            out: list[int] = []
            while [p for p in parts if await consumer.position(p) < ends[p]]:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(seq_of(r.value or b"") for r in records)
            return out
        finally:
            await consumer.stop()

    async def cleanup(self) -> None:
        admin = private.kafka_admin()
        await admin.start()
        with contextlib.suppress(Exception):
            await admin.delete_topics([self.topic])
        await admin.close()


class PostgresSink(SinkLeg):
    label, service, port, dedupes = "PostgreSQL", "postgres-tls", PG_PORT, True

    @property
    def table(self) -> str:
        return f"rout_{self.scope}"

    def options(self, address: str) -> dict[str, Any]:
        return {"type": "postgres", **private.postgres_options(address), "table": self.table,
                "create_table": True}

    async def _query(self, sql: str) -> list[asyncpg.Record]:
        conn = await private.pg_connect()
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql)
            return rows
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await conn.close()

    async def count(self) -> int:
        rows = await self._query(f'SELECT count(*) AS n FROM "{self.table}"')
        return int(rows[0]["n"]) if rows else 0

    async def seqs(self) -> list[int]:
        return [seq_of(bytes(r["data"])) for r in
                await self._query(f'SELECT data FROM "{self.table}"')]

    async def cleanup(self) -> None:
        conn = await private.pg_connect()
        await conn.execute(f'DROP TABLE IF EXISTS "{self.table}"')
        await conn.close()


class RedisStreamSink(SinkLeg):
    label, service, port = "Redis stream", "redis-tls", REDIS_PORT

    def options(self, address: str) -> dict[str, Any]:
        return {"type": "redis_stream", **private.redis_options(address),
                "stream": f"rout:{self.scope}"}

    async def count(self) -> int:
        r = private.redis_client()
        try:
            return int(await r.xlen(f"rout:{self.scope}"))
        finally:
            await r.aclose()

    async def seqs(self) -> list[int]:
        r = private.redis_client()
        try:
            entries: Any = await r.xrange(f"rout:{self.scope}")
            return [seq_of(fields[b"data"]) for _, fields in entries]
        finally:
            await r.aclose()

    async def cleanup(self) -> None:
        r = private.redis_client()
        await r.delete(f"rout:{self.scope}")
        await r.aclose()


SOURCES: dict[str, type[SourceLeg]] = {
    "jetstream": JetStreamSource, "kafka": KafkaSource, "redis_stream": RedisStreamSource,
    "redis_list": RedisListSource, "postgres_outbox": OutboxSource,
}
SINKS: dict[str, type[SinkLeg]] = {
    "jetstream": JetStreamSink, "kafka": KafkaSink, "postgres": PostgresSink,
    "redis_stream": RedisStreamSink,
}
# Every at-least-once pair (docs/delivery.md), as source -> sink.
PAIRS: list[tuple[str, str]] = [
    ("jetstream", "jetstream"), ("jetstream", "kafka"), ("kafka", "jetstream"),
    ("jetstream", "postgres"), ("postgres_outbox", "jetstream"),
    ("jetstream", "redis_stream"), ("redis_stream", "jetstream"), ("redis_list", "jetstream"),
]
# Sources whose delivery table row says at least once.
AT_LEAST_ONCE = {"jetstream", "kafka", "redis_stream", "redis_list", "postgres_outbox"}
