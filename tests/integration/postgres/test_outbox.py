"""The ``postgres_outbox`` source against the real server: replicas share a table
without overlap, leases (expiry, renewal, nack delay), parking, the NOTIFY
wake-up, marking rows sent, and the column mapping."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from natsconn_postgres.outbox import OutboxSource

from connector import Batch, ConnectorError, Message
from connector.testing.kit import collect, collect_batches

pytestmark = pytest.mark.integration


async def _outbox_table(db: asyncpg.Connection, table: str, extra: str = "") -> None:
    await db.execute(f"""CREATE TABLE "{table}" (
        id bigserial PRIMARY KEY, subject text, key bytea, headers jsonb,
        data bytea NOT NULL, claimed_until timestamptz{extra})""")


async def _insert(db: asyncpg.Connection, table: str, payloads: list[bytes]) -> None:
    await db.executemany(f'INSERT INTO "{table}" (subject, data) VALUES ($1, $2)',
                         [("out.x", p) for p in payloads])


async def _source(dsn: str, table: str, **options: Any) -> OutboxSource:
    source = OutboxSource.make_test_instance(dsn=dsn, table=table,
                                             **{"lease": 2.0, "poll_interval": 0.1, **options})
    await source.connect()
    return source


async def _read(source: OutboxSource, max_messages: int = 50, wait: float = 0.3
                ) -> Batch | None:
    return await asyncio.wait_for(source.read_batch(max_messages, wait), wait + 10)


async def test_replicas_share_the_table_without_overlap(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    table = tables("share")
    await _outbox_table(db, table)
    await _insert(db, table, [b"m%04d" % i for i in range(1000)])
    a = await _source(postgres_dsn, table, lease=60)
    b = await _source(postgres_dsn, table, lease=60)
    held: dict[str, list[Batch]] = {"a": [], "b": []}
    try:
        while True:  # alternate reads, nothing acknowledged: claims must not overlap
            got_a = await _read(a)
            got_b = await _read(b)
            for name, got in (("a", got_a), ("b", got_b)):
                if got is not None:
                    held[name].append(got)
            if got_a is None and got_b is None:
                break
        ids = {name: [m.id for batch in batches for m in batch.messages]
               for name, batches in held.items()}
        assert ids["a"] and ids["b"], "both replicas should have claimed rows"
        assert not set(ids["a"]) & set(ids["b"]), "a row was claimed by both replicas"
        data = sorted(m.data for batches in held.values() for b_ in batches
                      for m in b_.messages)
        assert data == [b"m%04d" % i for i in range(1000)]
        for batch in held["a"] + held["b"]:
            await batch.ack.ack()
        assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 0
    finally:
        await a.close()
        await b.close()


async def test_a_crashed_claim_comes_back_after_its_lease(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    """A replica that dies with rows claimed (no close, no ack) holds them only for
    the lease; then another replica sends them."""
    table = tables("crash")
    await _outbox_table(db, table)
    await _insert(db, table, [b"a", b"b", b"c"])
    dead = await _source(postgres_dsn, table, lease=2)
    first = await _read(dead)
    assert first is not None and len(first) == 3
    dead._pool.terminate()  # the process is gone: no ack, no release
    other = await _source(postgres_dsn, table, lease=2)
    try:
        assert await _read(other, wait=0.5) is None, "claimed rows were handed out again"
        again = await collect(other, 3, 10.0)
        assert sorted(m.data for m in again) == [b"a", b"b", b"c"]
        assert [m.id for m in again] == [m.id for m in first.messages]
    finally:
        await other.close()


async def test_in_progress_renews_the_lease(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    table = tables("renew")
    await _outbox_table(db, table)
    await _insert(db, table, [b"slow"])
    a = await _source(postgres_dsn, table, lease=1.5)
    b = await _source(postgres_dsn, table, lease=1.5)
    try:
        batch = await _read(a)
        assert batch is not None
        for _ in range(8):  # 4 s, well past the 1.5 s lease
            await batch.ack.in_progress()
            assert await _read(b, wait=0.5) is None, "a renewed claim was taken over"
        await batch.ack.ack()
        assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 0
    finally:
        await a.close()
        await b.close()


async def test_nack_delay_and_term(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    """nack(delay) keeps the rows away for the delay; term parks them for good."""
    table = tables("nack")
    await _outbox_table(db, table)
    await _insert(db, table, [b"later", b"poison"])
    source = await _source(postgres_dsn, table, lease=30)
    try:
        later = await _read(source, max_messages=1)
        poison = await _read(source, max_messages=1)
        assert later is not None and poison is not None
        assert later.messages[0].data == b"later" and poison.messages[0].data == b"poison"
        nacked_at = time.monotonic()
        await later.ack.nack(3.0)
        await poison.ack.term("rejected: no dead letter")
        back = await collect(source, 1, 15.0)
        assert [m.data for m in back] == [b"later"]
        assert time.monotonic() - nacked_at >= 2.5, "the nack delay was not kept"
        assert await collect(source, 1, 1.5) == [], "a parked row was sent"
        parked = await db.fetchval(f"SELECT claimed_until = 'infinity' FROM \"{table}\" "
                                   "WHERE data = $1", b"poison")
        assert parked is True
    finally:
        await source.close()


async def test_close_hands_unsettled_rows_back_at_once(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    table = tables("release")
    await _outbox_table(db, table)
    await _insert(db, table, [b"x%d" % i for i in range(10)])
    a = await _source(postgres_dsn, table, lease=300)
    batches = await collect_batches(a, 10, 10.0)
    assert sum(len(b) for b in batches) == 10
    await a.close()
    b = await _source(postgres_dsn, table, lease=300)
    try:
        got = await collect(b, 10, 5.0)  # far inside the 300 s lease
        assert sorted(m.data for m in got) == [b"x%d" % i for i in range(10)]
    finally:
        await b.close()


async def test_close_with_a_claim_ahead_in_flight_loses_and_repeats_nothing(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    """A full claim starts the next one at once (claim ahead). close() while that
    claim is still running in the server waits for it and hands its rows back:
    with a 300 s lease, a new instance gets every remaining row, each once.

    The claim ahead is held in the server by a trigger that waits on an advisory
    lock this test holds, for rows past the first batch only."""
    table = tables("ahead")
    await _outbox_table(db, table)
    await _insert(db, table, [b"r%03d" % i for i in range(300)])
    lock = int.from_bytes(table.encode()[-6:], "big")
    hold = f"{table}_hold"
    await db.execute(f"""CREATE FUNCTION "{hold}"() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_advisory_xact_lock_shared({lock}); RETURN NEW; END $$""")
    await db.execute(f'CREATE TRIGGER hold BEFORE UPDATE ON "{table}" FOR EACH ROW '
                     f'WHEN (NEW.id > 100) EXECUTE FUNCTION "{hold}"()')

    async def claim_waiting() -> bool:
        return bool(await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND wait_event = 'advisory' AND position($1 in query) > 0", f'"{table}"'))

    a = await _source(postgres_dsn, table, lease=300)
    closing: asyncio.Task[None] | None = None
    await db.execute("SELECT pg_advisory_lock($1)", lock)
    try:
        first = await _read(a, max_messages=100)
        assert first is not None
        assert [m.data for m in first.messages] == [b"r%03d" % i for i in range(100)]
        await first.ack.ack()
        deadline = time.monotonic() + 10
        while not await claim_waiting():  # rows 101-200: claimed ahead, held by the lock
            assert time.monotonic() < deadline, "no claim ahead started"
            await asyncio.sleep(0.05)
        closing = asyncio.create_task(a.close())
        await asyncio.sleep(0.5)
        assert not closing.done(), "close() did not wait for the claim in flight"
    finally:
        await db.execute("SELECT pg_advisory_unlock($1)", lock)
        if closing is None:
            await a.close()
    await asyncio.wait_for(closing, 15)
    b = await _source(postgres_dsn, table, lease=300)
    try:
        got = await collect(b, 200, 10.0)
        assert await collect(b, 1, 1.0) == [], "a row came twice"
        assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 0
    finally:
        await b.close()
        await db.execute(f'DROP FUNCTION "{hold}"() CASCADE')  # and the trigger
    assert sorted(m.data for m in got) == [b"r%03d" % i for i in range(100, 300)]
    assert len({m.id for m in got}) == 200


async def test_create_table_mark_sent_and_notify_trigger(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    """create_table with notify_channel adds a trigger, so an insert wakes the source
    although it polls only every minute; on_sent mark keeps sent rows, marked."""
    table = tables("created")
    source = await _source(postgres_dsn, table, create_table=True, on_sent="mark",
                           notify_channel=f"{table}_new", poll_interval="60s",
                           columns={"timestamp": "created_at"})
    try:
        assert await _read(source, wait=0.2) is None  # the first, empty claim
        await db.execute(f'INSERT INTO "{table}" (subject, key, headers, data) VALUES '
                         "('orders.1', 'k1', '{\"A\": \"1\", \"n\": 2}', 'hello')")
        got = await collect(source, 1, 5.0)
        assert len(got) == 1
        m = got[0]
        assert (m.data, m.subject, m.key) == (b"hello", "orders.1", b"k1")
        assert m.headers == {"A": "1", "n": "2"}
        assert m.id is not None and m.id.startswith(f"{table}:")
        assert m.timestamp is not None and abs(m.timestamp - time.time()) < 60
        sent = await db.fetchrow(f'SELECT sent_at, claimed_until FROM "{table}"')
        assert sent is not None and sent["sent_at"] is not None
        assert sent["claimed_until"] is None
        assert await _read(source, wait=0.5) is None, "a row marked sent came again"
    finally:
        await source.close()


async def test_text_and_jsonb_payload_columns(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    table = tables("types")
    await db.execute(f"""CREATE TABLE "{table}" (
        seq uuid PRIMARY KEY DEFAULT gen_random_uuid(), topic text, body jsonb NOT NULL,
        lease timestamptz)""")
    await db.execute(f'INSERT INTO "{table}" (topic, body) VALUES ($1, $2)', "t.1",
                     json.dumps({"a": [1, 2]}))
    source = await _source(postgres_dsn, table, id_column="seq", lease_column="lease",
                           columns={"data": "body", "subject": "topic"})
    try:
        got: list[Message] = await collect(source, 1, 5.0)
        assert len(got) == 1
        assert json.loads(got[0].data) == {"a": [1, 2]} and got[0].subject == "t.1"
        assert got[0].key is None and got[0].headers == {}
        assert await db.fetchval(f'SELECT count(*) FROM "{table}"') == 0
    finally:
        await source.close()


async def test_missing_columns_are_named(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    table = tables("nolease")
    await db.execute(f'CREATE TABLE "{table}" (id bigserial PRIMARY KEY, data bytea)')
    source = OutboxSource.make_test_instance(dsn=postgres_dsn, table=table,
                                             columns={"key": "k"})
    with pytest.raises(ConnectorError, match=r"no column\(s\) claimed_until, k"):
        await source.connect()
    await source.close()
