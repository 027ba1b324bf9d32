"""PostgreSQL change data capture: the ``postgres_cdc`` source endpoint, its raw
legs, and the ``postgres_cdc -> jetstream`` pair.

A place is a table of 5 small columns (``id int8 PRIMARY KEY, a int4, b text,
c float8, d bool``), a publication of it and a logical slot (pgoutput) made
before the rows are written, so the slot holds every row change. The source is
"preloaded" by writing ``count`` rows with binary COPY, 1,000 per transaction
(``params.batch``): one pgoutput Insert per row. ``b`` is sized so that the
pipeline's JSON message (``include_types: false``) is about ``params.size``
bytes, at least 8 characters: ``--sizes 208`` gives 8 (5 small columns).

Raw consume legs (each reads the slot from its start to the last row):

- ``pg_recvlogical``: PostgreSQL's own client (Debian's postgresql-client),
  ``--start -o proto_version=1 -o publication_names=<pub> -f /dev/null -F 0``
  with ``--endpos`` the WAL position after the preload; timed from its start to
  its exit, its CPU from the children's rusage. The walsender decodes, the
  client writes the bytes away: the server's side of the work.
- ``decode``: this plugin's replication client (natsconn_postgres.replication)
  and pgoutput decoder, every message decoded, no JSON: the least a Python
  reader doing the decode costs.
- ``source``: the ``postgres_cdc`` source itself (read_batch, JSON messages,
  ack per batch) without the engine or a sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
from typing import Any

import asyncpg

from ..endpoint import Ready, Stopwatch
from ..model import Params, Place, Sample
from ..registry import Pair, endpoint, pair
from .postgres import _dsn, _Postgres

COLUMNS = ["id", "a", "b", "c", "d"]
JSON_OVERHEAD = 200  # bytes of a message around b's value (names, lsn, xid, ts...)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@endpoint
class PostgresCdc(_Postgres):
    """A table, its publication and a pgoutput slot holding its row changes."""

    name = "postgres_cdc"
    durable = True
    gives_ids = True  # <commit LSN>:<position>
    consume_legs = {
        "pg_recvlogical": "PostgreSQL's pg_recvlogical, pgoutput proto 1, to /dev/null, "
                          "--endpos the WAL after the preload",
        "decode": "this plugin's replication client + pgoutput decode of every message, "
                  "no JSON",
        "source": "the postgres_cdc source alone: read_batch (JSON messages) + ack",
    }
    produce_legs = {"copy": "binary COPY of 5 small columns, 1,000 rows per transaction"}
    feed_technique = "copy"

    async def create(self, tag: str, params: Params, role: str) -> Place:
        if role != "source":
            raise NotImplementedError("postgres_cdc is a source")
        table = f"bench_{tag}_cdc"
        slot = f"bench_{tag}_slot"
        await self.conn.execute(f"CREATE TABLE {table} (id int8 PRIMARY KEY, a int4, b text, "
                                f"c float8, d bool); CREATE PUBLICATION {slot} FOR TABLE "
                                f"{table}")
        await self.conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                                slot)
        return {"table": table, "slot": slot, "subject": f"bench.{tag}.cdc"}

    async def destroy(self, place: Place) -> None:
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            for _ in range(50):
                try:
                    await self.conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE slot_name = $1", place["slot"])
                    break
                except asyncpg.ObjectInUseError:
                    await self.conn.execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                        "WHERE slot_name = $1", place["slot"])
                    await asyncio.sleep(0.1)
            await self.conn.execute(f"DROP PUBLICATION IF EXISTS {place['slot']}; "
                                    f"DROP TABLE IF EXISTS {place['table']}")

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "postgres_cdc", "dsn": self.dsn, "slot": place["slot"],
                "publication": place["slot"], "tables": [place["table"]],
                "create_slot": False, "create_publication": False,
                "include_types": False, "subject": place["subject"] + ".{table}"}

    # ---- the feed

    async def produce_copy(self, place: Place, params: Params) -> Sample:
        b = "x" * max(8, params.size - JSON_OVERHEAD)
        left = {"next": 0}
        table = place["table"]

        async def work(conn: asyncpg.Connection) -> None:
            while left["next"] < params.count:
                first = left["next"]
                k = min(params.batch, params.count - first)
                left["next"] = first + k
                rows = [(i, i % 1000, b, i * 0.5, i % 2 == 0) for i in range(first, first + k)]
                async with conn.transaction():
                    await conn.copy_records_to_table(table, columns=COLUMNS, records=rows)

        conn = await asyncpg.connect(_dsn(self.env))
        try:
            watch = Stopwatch()
            await work(conn)  # one writer: commit order is row order
            return watch.sample(params.count)
        finally:
            await conn.close()

    # ---- raw legs

    async def consume_pg_recvlogical(self, place: Place, params: Params,
                                     ready: Ready) -> Sample:
        binary = shutil.which("pg_recvlogical") or "/usr/bin/pg_recvlogical"
        conn = await asyncpg.connect(self.dsn)
        try:
            endpos = str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
        finally:
            await conn.close()
        await ready()
        cpu0 = _children_cpu()
        watch = Stopwatch()
        proc = await asyncio.create_subprocess_exec(
            binary, "-d", self.dsn, "--slot", place["slot"], "--start", "--no-loop",
            "-o", "proto_version=1", "-o", f"publication_names={place['slot']}",
            "-f", "/dev/null", "-F", "0", "-E", endpos,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 600)
        sample = watch.sample(params.count)
        sample.cpu_seconds += _children_cpu() - cpu0
        if proc.returncode != 0:
            sample.notes.append(f"pg_recvlogical exit {proc.returncode}: "
                                f"{err.decode(errors='replace').strip()[:200]}")
        return sample

    async def consume_decode(self, place: Place, params: Params, ready: Ready) -> Sample:
        from natsconn_postgres import pgoutput as pgo
        from natsconn_postgres.connection import PostgresConnectionConfig
        from natsconn_postgres.replication import ReplicationConnection

        cfg = PostgresConnectionConfig.model_validate({"dsn": self.dsn})
        conn = await ReplicationConnection.open(cfg, {"application_name": "bench-decode"})
        await conn.start_replication(place["slot"], {
            "proto_version": "1", "publication_names": f'"{place["slot"]}"'})
        await ready()
        decode, inserts = pgo.decode, 0
        insert = pgo.Insert
        last = 0
        watch = Stopwatch()
        while inserts < params.count:
            for kind, lsn, payload in await conn.read_frames(30.0):
                if kind == 0x77:
                    msg = decode(payload)
                    if type(msg) is insert:
                        inserts += 1
                    last = lsn
        sample = watch.sample(inserts)
        conn.send_status(last)
        await conn.close()
        return sample

    async def consume_source(self, place: Place, params: Params, ready: Ready) -> Sample:
        from natsconn_postgres.cdc import CdcSource

        block = {k: v for k, v in self.source_block(place, params).items() if k != "type"}
        source = CdcSource.make_test_instance(**block)
        await source.connect()
        await ready()
        count = 0
        watch = Stopwatch()
        try:
            while count < params.count:
                batch = await source.read_batch(params.batch, params.max_wait)
                if batch is None:
                    continue
                count += len(batch.messages)
                await batch.ack.ack()
            return watch.sample(count)
        finally:
            await source.close()


pair(Pair("postgres_cdc", "jetstream", count=200_000, quick_count=20_000, default=False))
