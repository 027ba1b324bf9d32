"""The ``postgres`` sink against the real server: column mapping and types, the
bad-row bisection, upsert, id dedupe, and how failures are classified."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from natsconn_postgres.connection import command_timeout_of
from natsconn_postgres.sink import PostgresSink

from connector import ConnectorError, Message, PartialWriteError, RejectedError, RetryableError

pytestmark = pytest.mark.integration


def _msg(i: int, data: bytes | None = None) -> Message:
    return Message(data if data is not None else b'{"n":%d}' % i, "t.x", None, {},
                   time.time(), f"S:{i}")


async def _sink(dsn: str, **options: Any) -> PostgresSink:
    sink = PostgresSink.make_test_instance(dsn=dsn, **options)
    await sink.connect()
    return sink


async def test_column_mapping_and_types(postgres_dsn: str, db: asyncpg.Connection,
                                        tables: Callable[[str], str]) -> None:
    """Every kind of source into typed columns; create_table makes the types."""
    table = tables("mapping")
    sink = await _sink(postgres_dsn, table=table, create_table=True, mode="insert", columns={
        "id": "id",
        "doc": {"from": "data", "type": "jsonb"},
        "raw": "data",
        "txt": {"from": "data", "type": "text"},
        "subject": "subject",
        "k": {"from": "key", "type": "text"},
        "tenant": "header.Tenant",
        "hdrs": "headers",
        "order_id": {"from": "data.order.id", "type": "bigint"},
        "sku": {"from": "data.items.0.sku", "type": "text"},
        "price": {"from": "data.order.price", "type": "numeric(10,2)"},
        "paid": {"from": "data.order.paid", "type": "boolean"},
        "at": {"from": "data.order.at", "type": "timestamptz"},
        "uid": {"from": "data.order.uid", "type": "uuid"},
        "nested": "data.order",
        "absent": {"from": "data.nope.x", "type": "text"},
        "ts": "timestamp",
    })
    uid = uuid.uuid4()
    data = json.dumps({"order": {"id": "42", "price": 9.5, "paid": True,
                                 "at": "2024-05-01T12:00:00Z", "uid": str(uid)},
                       "items": [{"sku": "A-1"}]}).encode()
    sent = Message(data, "orders.eu", b"key-1", {"Tenant": "acme", "X-A": "1"}, 1_700_000_000.5,
                   "ORDERS:7")
    try:
        await sink.write_batch([sent])
    finally:
        await sink.close()
    row = await db.fetchrow(f'SELECT * FROM "{table}"')
    assert row is not None
    assert row["id"] == "ORDERS:7"
    assert json.loads(row["doc"]) == json.loads(data)
    assert row["raw"] == data and row["txt"] == data.decode()
    assert row["subject"] == "orders.eu" and row["k"] == "key-1" and row["tenant"] == "acme"
    assert json.loads(row["hdrs"]) == {"Tenant": "acme", "X-A": "1"}
    assert row["order_id"] == 42  # "42" in the JSON, bigint in the table
    assert row["sku"] == "A-1"
    assert row["price"] == Decimal("9.50")
    assert row["paid"] is True
    assert row["at"] == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
    assert row["uid"] == uid
    assert json.loads(row["nested"])["id"] == "42"
    assert row["absent"] is None
    assert row["ts"] == dt.datetime.fromtimestamp(1_700_000_000.5, dt.UTC)
    types = dict(await db.fetch(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1",
        table))
    assert types["order_id"] == "bigint" and types["hdrs"] == "jsonb" and types["raw"] == "bytea"
    assert types["ts"] == "timestamp with time zone"


@pytest.mark.parametrize("mode", ["copy", "insert"])
async def test_one_bad_row_in_1000_is_rejected_alone(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str], mode: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The bad row comes back as RejectedError with the database's error, the other
    999 are committed, and it was found by bisection, not row by row."""
    table = tables(f"bad_{mode}")
    await db.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY, '
                     f'n int CONSTRAINT n_not_negative CHECK (n >= 0))')
    sink = await _sink(postgres_dsn, table=table, mode=mode,
                       columns={"id": "id", "n": "data.n"})
    messages = [_msg(i, b'{"n":%d}' % (-1 if i == 437 else i)) for i in range(1000)]
    caplog.set_level(logging.WARNING)
    try:
        with pytest.raises(PartialWriteError) as info:
            await sink.write_batch(messages)
    finally:
        await sink.close()
    failed = info.value.failed
    assert list(failed) == [437]
    error = failed[437]
    assert isinstance(error, RejectedError)
    assert "23514" in str(error) and "n_not_negative" in str(error), str(error)
    ids = {r["id"] for r in await db.fetch(f'SELECT id FROM "{table}"')}
    assert ids == {f"S:{i}" for i in range(1000) if i != 437}
    counts = [int(m.group(1)) for m in (re.search(r"in (\d+) statement", r.getMessage())
                                        for r in caplog.records) if m]
    assert counts and counts[0] <= 2 * 10, f"isolation statements: {counts}"


async def test_several_kinds_of_bad_rows(postgres_dsn: str, db: asyncpg.Connection,
                                         tables: Callable[[str], str]) -> None:
    """A duplicate unique value, a NOT NULL violation, invalid JSON for jsonb, a NUL
    in text, and a value the mapping cannot convert: each rejected alone."""
    table = tables("kinds")
    await db.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY, email text UNIQUE, '
                     'name text NOT NULL, doc jsonb, n int)')
    sink = await _sink(postgres_dsn, table=table, mode="copy", columns={
        "id": "id", "email": "header.Email", "name": "header.Name",
        "doc": {"from": "data"}, "n": "header.N"})
    messages = []
    for i in range(200):
        headers = {"Email": f"u{i}@x", "Name": f"n{i}", "N": str(i)}
        data = b'{"i":%d}' % i
        if i == 10:
            headers["Email"] = "u3@x"  # duplicate of row 3
        if i == 50:
            del headers["Name"]  # NOT NULL
        if i == 90:
            data = b"{not json"
        if i == 120:
            headers["Name"] = "nul\x00here"
        if i == 150:
            headers["N"] = "not-a-number"
        messages.append(Message(data, None, None, headers, None, f"S:{i}"))
    try:
        with pytest.raises(PartialWriteError) as info:
            await sink.write_batch(messages)
    finally:
        await sink.close()
    failed = info.value.failed
    assert sorted(failed) == [10, 50, 90, 120, 150]
    assert all(isinstance(e, RejectedError) for e in failed.values())
    assert "23505" in str(failed[10]) and "23502" in str(failed[50])
    assert "22P02" in str(failed[90]) and "column 'n'" in str(failed[150])
    assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 195


async def test_copy_dedupes_a_redelivered_batch(postgres_dsn: str, db: asyncpg.Connection,
                                                tables: Callable[[str], str]) -> None:
    """A batch that overlaps one already written adds only the new ids (COPY mode
    goes through the temporary stage table and ON CONFLICT DO NOTHING)."""
    table = tables("dedupe")
    sink = await _sink(postgres_dsn, table=table, create_table=True)
    try:
        await sink.write_batch([_msg(i) for i in range(0, 600)])
        await sink.write_batch([_msg(i) for i in range(300, 1000)])  # 300 seen again
        await sink.write_batch([_msg(i) for i in range(0, 1000)])
    finally:
        await sink.close()
    assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 1000
    assert await db.fetchval(f'SELECT count(DISTINCT id) FROM "{table}"') == 1000


async def test_dedupe_needs_a_unique_index(postgres_dsn: str, db: asyncpg.Connection,
                                           tables: Callable[[str], str]) -> None:
    """An id column without a unique index stops connect() with the fix; with
    dedupe: false the sink is plain at-least-once COPY."""
    table = tables("nounique")
    await db.execute(f'CREATE TABLE "{table}" (id text, data bytea)')
    sink = PostgresSink.make_test_instance(dsn=postgres_dsn, table=table,
                                           columns={"id": "id", "data": "data"})
    with pytest.raises(ConnectorError, match="CREATE UNIQUE INDEX"):
        await sink.connect()
    await sink.close()
    sink = await _sink(postgres_dsn, table=table, dedupe=False,
                       columns={"id": "id", "data": "data"})
    try:
        await sink.write_batch([_msg(1), _msg(2)])
        await sink.write_batch([_msg(1)])
    finally:
        await sink.close()
    assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 3


async def test_missing_table_or_column(postgres_dsn: str, db: asyncpg.Connection,
                                       tables: Callable[[str], str]) -> None:
    table = tables("missing")
    sink = PostgresSink.make_test_instance(dsn=postgres_dsn, table=table)
    with pytest.raises(ConnectorError, match="does not exist; create it, or set create_table"):
        await sink.connect()
    await db.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY, data bytea)')
    sink = PostgresSink.make_test_instance(dsn=postgres_dsn, table=table)
    with pytest.raises(ConnectorError, match="has no column"):
        await sink.connect()


@pytest.mark.parametrize("mode", ["upsert-last", "upsert-first"])
async def test_upsert_repeated_keys(postgres_dsn: str, db: asyncpg.Connection,
                                    tables: Callable[[str], str], mode: str) -> None:
    """Repeated keys, within a batch and across batches, leave one row per key:
    the latest values with DO UPDATE, the first with DO NOTHING."""
    table = tables("upsert")
    on_conflict = "update" if mode == "upsert-last" else "nothing"
    sink = await _sink(postgres_dsn, table=table, create_table=True, mode="upsert",
                       key_columns=["k"], on_conflict=on_conflict, columns={
                           "k": {"from": "data.k", "type": "text"},
                           "v": {"from": "data.v", "type": "int"}, "id": "id"})
    seq = 0
    expected: dict[str, int] = {}
    try:
        for _batch in range(5):
            messages = []
            for _ in range(400):
                key = f"key-{seq % 37}"
                messages.append(Message(json.dumps({"k": key, "v": seq}).encode(), id=f"S:{seq}"))
                if on_conflict == "update" or key not in expected:
                    expected[key] = seq
                seq += 1
            await sink.write_batch(messages)
    finally:
        await sink.close()
    rows = {r["k"]: r["v"] for r in await db.fetch(f'SELECT k, v FROM "{table}"')}
    assert rows == expected


async def test_upsert_version_column_keeps_newer(postgres_dsn: str, db: asyncpg.Connection,
                                                 tables: Callable[[str], str]) -> None:
    """With version_column, an older message written late does not overwrite."""
    table = tables("version")
    sink = await _sink(postgres_dsn, table=table, create_table=True, mode="upsert",
                       key_columns=["k"], version_column="seq", columns={
                           "k": {"from": "data.k", "type": "text"},
                           "v": {"from": "data.v", "type": "text"},
                           "seq": {"from": "data.seq", "type": "bigint"}})

    def m(seq: int, v: str) -> Message:
        return Message(json.dumps({"k": "a", "v": v, "seq": seq}).encode())

    try:
        await sink.write_batch([m(5, "new")])
        await sink.write_batch([m(3, "old")])  # a redelivery of an older message
        await sink.write_batch([m(9, "newest")])
    finally:
        await sink.close()
    assert await db.fetchval(f'SELECT v FROM "{table}" WHERE k = $1', "a") == "newest"
    assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 1


async def test_upsert_version_column_within_one_batch(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    """A redelivered older message after a newer one of the same key in ONE batch:
    the newer values are written (keeping the later row, as without a version
    column, lost them: the guard refused the older row and the newer never went)."""
    table = tables("version1")
    sink = await _sink(postgres_dsn, table=table, create_table=True, mode="upsert",
                       key_columns=["k"], version_column="seq", columns={
                           "k": {"from": "data.k", "type": "text"},
                           "v": {"from": "data.v", "type": "text"},
                           "seq": {"from": "data.seq", "type": "bigint"}})

    def m(k: str, seq: int | None) -> Message:
        return Message(json.dumps({"k": k, "v": f"{k}{seq}", "seq": seq}).encode())

    try:
        await sink.write_batch([m("a", 9), m("b", 4), m("a", 3), m("b", 4), m("c", None),
                                m("c", 1), m("d", 2), m("d", None)])
    finally:
        await sink.close()
    rows = {r["k"]: r["v"] for r in await db.fetch(f'SELECT k, v FROM "{table}"')}
    assert rows == {"a": "a9", "b": "b4", "c": "c1", "d": "d2"}


async def test_upsert_concurrent_batches_do_not_deadlock(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    """Eight batches at once over the same 200 keys, each in its own order: rows go
    out sorted by key, so the transactions lock them in one order and none is
    chosen as a deadlock victim (40P01 would surface as a RetryableError)."""
    table = tables("nodeadlock")
    sink = await _sink(postgres_dsn, table=table, create_table=True, mode="upsert",
                       key_columns=["k"], version_column="seq", pool_size=8, columns={
                           "k": {"from": "data.k", "type": "text"},
                           "seq": {"from": "data.seq", "type": "bigint"}})
    keys = [f"key-{i:03}" for i in range(200)]

    def batch(n: int) -> list[Message]:
        order = keys[n * 25:] + keys[:n * 25]  # each batch starts elsewhere
        if n % 2:
            order.reverse()
        return [Message(json.dumps({"k": k, "seq": n}).encode()) for k in order]

    try:
        for _round in range(5):
            await asyncio.gather(*(sink.write_batch(batch(n)) for n in range(8)))
    finally:
        await sink.close()
    seqs = {r["k"]: r["seq"] for r in await db.fetch(f'SELECT k, seq FROM "{table}"')}
    assert seqs == {k: 7 for k in keys}


async def test_upsert_needs_a_unique_key(postgres_dsn: str, db: asyncpg.Connection,
                                         tables: Callable[[str], str]) -> None:
    table = tables("upsertkey")
    await db.execute(f'CREATE TABLE "{table}" (k text, v text)')
    sink = PostgresSink.make_test_instance(dsn=postgres_dsn, table=table, mode="upsert",
                                           key_columns=["k"], columns={"k": "subject",
                                                                       "v": "data"})
    with pytest.raises(ConnectorError, match=r"unique index or primary key on exactly \(k\)"):
        await sink.connect()


async def test_statement_timeout_is_retryable_not_poison(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    """A write cut short by statement_timeout is retried, never dead-lettered."""
    table = tables("slow")
    await db.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY, data bytea)')
    await db.execute(f"""CREATE FUNCTION "{table}_slow"() RETURNS trigger LANGUAGE plpgsql
                         AS $$ BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$""")
    await db.execute(f'CREATE TRIGGER slow BEFORE INSERT ON "{table}" FOR EACH STATEMENT '
                     f'EXECUTE FUNCTION "{table}_slow"()')
    sink = await _sink(postgres_dsn, table=table, mode="insert", statement_timeout="100ms",
                       columns={"id": "id", "data": "data"})
    try:
        with pytest.raises(RetryableError, match="57014"):
            await sink.write_batch([_msg(1)])
    finally:
        await sink.close()
        await db.execute(f'DROP FUNCTION "{table}_slow"() CASCADE')
    assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 0


def test_config_errors() -> None:
    """Mistakes in the options are found before connecting."""
    def bad(**options: object) -> str:
        with pytest.raises(ValueError) as info:
            PostgresSink.Config.model_validate({"table": "t", **options})
        return str(info.value)

    assert "needs key_columns" in bad(mode="upsert")
    assert "is not in `columns`" in bad(mode="upsert", key_columns=["nope"])
    assert "expected data, data.<path>" in bad(columns={"a": "payload"})
    assert "for mode: upsert" in bad(key_columns=["id"])
    assert "does not look like an SQL type" in bad(columns={"a": {"from": "data",
                                                                   "type": "int; DROP"}})


async def test_messages_without_ids_are_stored(postgres_dsn: str, db: asyncpg.Connection,
                                               tables: Callable[[str], str]) -> None:
    """A source without ids (core NATS, LISTEN): NULL ids are stored, never merged,
    while messages with ids are still deduplicated in the same table."""
    table = tables("noids")
    sink = await _sink(postgres_dsn, table=table, create_table=True)
    try:
        anonymous = [Message(b"a%d" % i, "core.x") for i in range(5)]
        await sink.write_batch(anonymous)
        await sink.write_batch(anonymous)  # no id: nothing to tell them apart by
        await sink.write_batch([_msg(1), _msg(1)])
    finally:
        await sink.close()
    assert await db.fetchval(f'SELECT count(*) FROM "{table}" WHERE id IS NULL') == 10
    assert await db.fetchval(f'SELECT count(*) FROM "{table}" WHERE id = $1', "S:1") == 1


async def test_a_stalled_connection_fails_the_write_at_command_timeout_then_recovers(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str],
        tcp_proxy: Any) -> None:
    """The server stops answering but the connection stays open (a stall, a dead
    host that sends no reset): statement_timeout cannot fire, since the server
    never got the statement. The client's command_timeout ends the write as
    retryable; after the stall the retry writes on a live connection, and the
    id dedupe keeps one row per message even if the stalled attempt committed."""
    table = tables("stalled")
    url = urlsplit(postgres_dsn)
    proxy = await tcp_proxy(url.hostname or "127.0.0.1", url.port or 5432)
    sink = await _sink(postgres_dsn, host=proxy.host, port=proxy.port, table=table,
                       create_table=True, command_timeout="1s", connect_timeout="2s")
    batch = [_msg(i) for i in range(1000, 2000)]
    try:
        await sink.write_batch([_msg(i) for i in range(1000)])
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(RetryableError):
            await asyncio.wait_for(sink.write_batch(batch), 30)
        assert time.monotonic() - started < 8, "the write outlived command_timeout"
        proxy.resume()
        for _ in range(50):  # as the engine would retry it
            try:
                await sink.write_batch(batch)
                break
            except RetryableError:
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("the write kept failing after the stall")
    finally:
        await sink.close()
    assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 2000
    assert await db.fetchval(f'SELECT count(DISTINCT id) FROM "{table}"') == 2000


def test_command_timeout_follows_statement_timeout_unless_given() -> None:
    config = PostgresSink.Config
    assert command_timeout_of(config(table="t")) == 70.0
    assert command_timeout_of(config(table="t", statement_timeout="5s")) == 15.0
    assert command_timeout_of(config(table="t", statement_timeout=0)) is None
    assert command_timeout_of(config(table="t", command_timeout="2s")) == 2.0
