"""PostgreSQL: the ``postgres`` sink and ``postgres_outbox`` source endpoints, raw
asyncpg legs, and their pairs.

Raw legs use asyncpg the fastest way we know, on ``max_in_flight`` connections
(the plugins' pool holds as many), one transaction per batch:

- produce ``copy``: ``copy_records_to_table`` (binary COPY) of a batch's rows.
- produce ``copy_dedupe``: what the sink does to be effectively once when a
  column takes ``Message.id`` (the default mapping): COPY into a temporary
  stage table, then ``INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING``.
  The ratio is taken against the faster of the two, plain COPY.
- consume ``skip_locked`` (outbox): claim and delete a batch in one statement,
  ``DELETE ... WHERE id IN (SELECT id ... ORDER BY id LIMIT n FOR UPDATE SKIP
  LOCKED) RETURNING ...``, committed once the batch is counted (at least once:
  a crash before the commit leaves the rows), ``max_in_flight`` claimers side
  by side.

Tables have the columns the plugins use by default (the sink's default
mapping: id, subject, key, headers, data, timestamp with a unique id; the
outbox's id, subject, key, headers, data, claimed_until), and rows the values
the pipeline writes for a JetStream message: a subject, no key, no headers.

The far side of a pipeline is counted without scanning the table: a
statement-level trigger with a transition table adds each statement's row
count to a small side table (one row per statement, so concurrent writers do
not wait on each other). COPY fires it as INSERT does; the raw legs pay for it
as the sink does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import os
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from ..endpoint import Endpoint, Ready, Stopwatch
from ..model import Params, Place, Sample
from ..registry import Pair, endpoint, pair

DEFAULT_DSN = "postgresql://natsconn:natsconn@127.0.0.1:5432/natsconn"
SINK_COLUMNS = ["id", "subject", "key", "headers", "data", "timestamp"]


def _dsn(env: dict[str, str]) -> str:
    return env.get("POSTGRES_DSN", DEFAULT_DSN)


async def _on_connections(dsn: str, n: int,
                          work: Callable[[asyncpg.Connection], Awaitable[None]],
                          messages: Callable[[], int],
                          prepare: Callable[[asyncpg.Connection], Awaitable[None]] | None
                          = None) -> Sample:
    """Open ``n`` connections (and ``prepare`` each), then time ``work(conn)`` running
    on all of them at once; ``messages()`` says how many it handled."""
    conns = [await asyncpg.connect(dsn) for _ in range(n)]
    try:
        if prepare is not None:
            for conn in conns:
                await prepare(conn)
        watch = Stopwatch()
        await asyncio.gather(*(work(conn) for conn in conns))
        return watch.sample(messages())
    finally:
        for conn in conns:
            await conn.close()


class _Postgres(Endpoint):
    system = "postgres"
    address_env = "POSTGRES_DSN"
    default_url = DEFAULT_DSN

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.dsn = _dsn(env)
        self._conn: asyncpg.Connection | None = None
        self._version = self._settings = "?"

    async def open(self) -> None:
        self._conn = await asyncpg.connect(self.dsn)
        self._version = str(await self._conn.fetchval("SHOW server_version"))
        settings = [f"{name} {await self._conn.fetchval(f'SHOW {name}')}"
                    for name in ("synchronous_commit", "fsync", "shared_buffers")]
        self._settings = ", ".join(settings)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    @property
    def conn(self) -> asyncpg.Connection:
        assert self._conn is not None, "open() first"
        return self._conn

    def describe(self) -> dict[str, str]:
        return {"asyncpg": importlib.metadata.version("asyncpg"),
                "postgresql": self._version,
                "postgres_settings": self._settings}


@endpoint
class PostgresTable(_Postgres):
    """A table in the sink's default mapping, with a unique id column."""

    name = "postgres"
    uses_ids = True  # the id column (unique) takes Message.id; the sink dedupes on it
    ids_label = "with unique ids"
    produce_legs = {
        "copy": "copy_records_to_table, one 1,000-row transaction per batch, "
                "max_in_flight connections",
        "copy_dedupe": "COPY into a temp stage table + INSERT ... ON CONFLICT (id) DO "
                       "NOTHING per transaction (the sink's effectively-once path)",
    }

    async def create(self, tag: str, params: Params, role: str) -> Place:
        if role != "sink":
            raise NotImplementedError("postgres is a sink")
        table = f"bench_{tag}_sink"
        counts, function = f"{table}_n", f"{table}_count"
        await self.conn.execute(f"""
            CREATE TABLE {table} (id text UNIQUE, subject text, key bytea, headers jsonb,
                                  data bytea, "timestamp" timestamptz);
            CREATE TABLE {counts} (n integer NOT NULL);
            CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
              BEGIN INSERT INTO {counts} SELECT count(*) FROM new_rows; RETURN NULL; END $$;
            CREATE TRIGGER {table}_counted AFTER INSERT ON {table}
              REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
              EXECUTE FUNCTION {function}();
        """)
        return {"table": table, "counts": counts, "function": function,
                "subject": f"bench.{tag}.source"}

    async def destroy(self, place: Place) -> None:
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await self.conn.execute(f"DROP TABLE IF EXISTS {place['table']}, "
                                    f"{place['counts']}; DROP FUNCTION IF EXISTS "
                                    f"{place['function']}()")

    async def delivered(self, place: Place) -> int:
        n = await self.conn.fetchval(f"SELECT coalesce(sum(n), 0) FROM {place['counts']}")
        return int(n)

    def sink_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "postgres", "dsn": self.dsn, "table": place["table"]}

    # ---- raw legs

    def _batches(self, place: Place, params: Params) -> Callable[[], list[tuple[Any, ...]] | None]:
        """A shared source of row batches for the connections to take from."""
        data, subject = os.urandom(params.size), place["subject"]
        prefix = f"{place['table']}:" if params.ids else None
        state = {"next": 0}

        def take() -> list[tuple[Any, ...]] | None:
            first = state["next"]
            if first >= params.count:
                return None
            k = min(params.batch, params.count - first)
            state["next"] = first + k
            now = dt.datetime.now(dt.UTC)
            if prefix is None:
                return [(None, subject, None, "{}", data, now)] * k
            return [(f"{prefix}{seq}", subject, None, "{}", data, now)
                    for seq in range(first, first + k)]

        return take

    async def produce_copy(self, place: Place, params: Params) -> Sample:
        take, table = self._batches(place, params), place["table"]

        async def work(conn: asyncpg.Connection) -> None:
            while (rows := take()) is not None:
                async with conn.transaction():
                    await conn.copy_records_to_table(table, columns=SINK_COLUMNS,
                                                     records=rows)

        return await _on_connections(self.dsn, params.max_in_flight, work,
                                     lambda: params.count)

    async def produce_copy_dedupe(self, place: Place, params: Params) -> Sample:
        take, table = self._batches(place, params), place["table"]
        stage = "bench_stage"
        cols = ", ".join(f'"{c}"' for c in SINK_COLUMNS)
        move = (f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage} "
                "ON CONFLICT (id) DO NOTHING")

        async def prepare(conn: asyncpg.Connection) -> None:
            await conn.execute(f"CREATE TEMP TABLE {stage} ON COMMIT DELETE ROWS AS "
                               f"SELECT {cols} FROM {table} WITH NO DATA")

        async def work(conn: asyncpg.Connection) -> None:
            while (rows := take()) is not None:
                async with conn.transaction():
                    await conn.copy_records_to_table(stage, columns=SINK_COLUMNS,
                                                     records=rows)
                    await conn.execute(move)

        return await _on_connections(self.dsn, params.max_in_flight, work,
                                     lambda: params.count, prepare)


@endpoint
class PostgresOutbox(_Postgres):
    """An outbox table as the ``postgres_outbox`` source reads it by default."""

    name = "postgres_outbox"
    durable = True
    gives_ids = True  # <table>:<row id>
    consume_legs = {"skip_locked": "DELETE ... WHERE id IN (SELECT ... ORDER BY id LIMIT "
                    "batch FOR UPDATE SKIP LOCKED) RETURNING ..., committed after the batch; "
                    "max_in_flight claimers"}
    feed_technique = "copy"  # fills the outbox before the clock starts

    async def create(self, tag: str, params: Params, role: str) -> Place:
        if role != "source":
            raise NotImplementedError("postgres_outbox is a source")
        table = f"bench_{tag}_outbox"
        await self.conn.execute(f"""
            CREATE TABLE {table} (id bigserial PRIMARY KEY, subject text, key bytea,
                                  headers jsonb, data bytea NOT NULL,
                                  claimed_until timestamptz)""")
        return {"table": table, "subject": f"bench.{tag}.outbox"}

    async def destroy(self, place: Place) -> None:
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await self.conn.execute(f"DROP TABLE IF EXISTS {place['table']}")

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "postgres_outbox", "dsn": self.dsn, "table": place["table"]}

    # ---- raw legs (and the feed)

    async def produce_copy(self, place: Place, params: Params) -> Sample:
        """Fill the outbox: COPY of subject and data, 1,000 rows per transaction."""
        data, subject, table = os.urandom(params.size), place["subject"], place["table"]
        left = {"n": params.count}

        async def work(conn: asyncpg.Connection) -> None:
            while left["n"] > 0:
                k = min(params.batch, left["n"])
                left["n"] -= k
                async with conn.transaction():
                    await conn.copy_records_to_table(table, columns=["subject", "data"],
                                                     records=[(subject, data)] * k)

        return await _on_connections(self.dsn, params.max_in_flight, work,
                                     lambda: params.count)

    async def consume_skip_locked(self, place: Place, params: Params, ready: Ready) -> Sample:
        table = place["table"]
        claim = (f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id "
                 f"LIMIT $1 FOR UPDATE SKIP LOCKED) "
                 "RETURNING id, subject, key, headers, data")
        counted = {"n": 0}

        async def work(conn: asyncpg.Connection) -> None:
            statement = await conn.prepare(claim)
            while True:
                async with conn.transaction():
                    rows = await statement.fetch(params.batch)
                    counted["n"] += len(rows)
                if not rows:
                    return  # empty (or the rest is claimed by the others)

        await ready()
        sample = await _on_connections(self.dsn, params.max_in_flight, work,
                                       lambda: counted["n"])
        if sample.messages < params.count:
            sample.notes.append(f"only {sample.messages} of {params.count} read")
        return sample


# JetStream <-> PostgreSQL (the jetstream endpoint is in legs/nats.py)
pair(Pair("jetstream", "postgres"))
pair(Pair("postgres_outbox", "jetstream", count=100_000))
