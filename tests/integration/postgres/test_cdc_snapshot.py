"""``postgres_cdc`` with ``snapshot: true``, on the real servers.

* In-process: existing rows of three tables (one empty) and writes committed
  while the snapshot is being read: every row that existed at the slot's
  consistent point exactly once as ``op: read`` (with its values as of then),
  every later change streamed after the snapshot and none lost; replaying the
  messages in order gives the tables' final contents. The sink's confirmation
  of the last row notes the snapshot as done; a new instance does not take it
  again.
* ``kill -9`` of ``natsconn run`` in the middle of the snapshot (into
  JetStream), writes going on, then a restart: the snapshot is taken again,
  the stream ends complete (replaying it gives the tables' contents), no id twice.

CI sizes: 6,000 rows (in-process) and 30,000 rows (kill -9);
``NATSCONN_CDC_FULL=1`` multiplies both by 10.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from natsconn_postgres.cdc import CdcSource

from ..helpers import (
    create_stream,
    natsconn_process,
    pipeline_file,
    read_stream,
    stream_count,
    wait_until,
)
from .test_cdc import cdc_names, drop_slot  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

FULL = os.environ.get("NATSCONN_CDC_FULL") == "1"
SCALE = 10 if FULL else 1


def replay(docs: list[dict[str, Any]], keys: dict[str, str] | None = None
           ) -> dict[str, dict[Any, dict[str, Any]]]:
    """The tables a consumer materialises from the messages, in stream order
    (``keys``: table -> key column, default ``id``)."""
    state: dict[str, dict[Any, dict[str, Any]]] = {}
    for d in docs:
        rows = state.setdefault(d["table"], {})
        key = (keys or {}).get(d["table"], "id")
        if d["op"] in ("read", "insert", "update"):
            if d["before"] is not None and d["before"].get(key) != d["after"][key]:
                rows.pop(d["before"][key], None)
            rows[d["after"][key]] = d["after"]
        elif d["op"] == "delete":
            rows.pop(d["before"][key], None)
    return state


async def contents(db: asyncpg.Connection, table: str, key: str) -> dict[Any, dict[str, Any]]:
    rows = await db.fetch(f'SELECT to_jsonb(t) AS j FROM "{table}" t')
    out = {}
    for r in rows:
        doc = json.loads(r["j"])
        out[doc[key]] = doc
    return out


async def test_snapshot_then_stream_every_row_once_consistent_with_the_slot(
        postgres_dsn: str, db: asyncpg.Connection, tables: Any, cdc_names: Any  # noqa: F811
        ) -> None:
    a, b, empty = tables("snapa"), tables("snapb"), tables("snape")
    n_a, n_b = 5000 * SCALE, 1000 * SCALE
    await db.execute(f'CREATE TABLE "{a}" (id int8 PRIMARY KEY, v int NOT NULL, note text)')
    await db.execute(f'CREATE TABLE "{b}" (k text PRIMARY KEY, n numeric, arr int[])')
    await db.execute(f'CREATE TABLE "{empty}" (id int PRIMARY KEY)')
    await db.execute(f"INSERT INTO \"{a}\" SELECT g, 0, 'row ' || g "
                     f"FROM generate_series(1, {n_a}) g")
    await db.execute(f"INSERT INTO \"{b}\" SELECT 'k' || g, g * 1.5, ARRAY[g, g + 1] "
                     f"FROM generate_series(1, {n_b}) g")
    slot = cdc_names()
    source = CdcSource.make_test_instance(dsn=postgres_dsn, slot=slot, tables=[a, b, empty],
                                          snapshot=True, include_types=True)
    await source.connect()
    docs: list[dict[str, Any]] = []
    ids: list[str] = []
    unacked: list[Any] = []

    async def take(batch_size: int) -> int:
        batch = await source.read_batch(batch_size, 0.3)
        if batch is None:
            return 0
        for m in batch.messages:
            docs.append(json.loads(m.data))
            ids.append(m.id or "")
        unacked.append(batch)
        return len(batch.messages)

    try:
        assert not source.snapshot_done
        await take(100)
        # writes committed after the slot's point, while the snapshot is read
        await db.execute(f'UPDATE "{a}" SET v = 1 WHERE id <= 300')
        await db.execute(f'DELETE FROM "{a}" WHERE id > {n_a - 100}')
        await db.execute(f"INSERT INTO \"{a}\" SELECT g, 2, 'new' FROM "
                         f"generate_series({n_a + 1}, {n_a + 200}) g")
        await db.execute(f"UPDATE \"{b}\" SET n = 0 WHERE k = 'k1'")
        await db.execute(f'INSERT INTO "{empty}" VALUES (1)')
        while sum(1 for d in docs if d["op"] == "read") < n_a + n_b:
            assert await take(700), "the snapshot ended early"
            if len(unacked) > 3:  # acknowledge, out of order now and then
                for batch in (unacked.pop(1), unacked.pop(0)):
                    await batch.ack.ack()
        expected = n_a + n_b + 300 + 100 + 200 + 1 + 1
        while len(docs) < expected:
            assert await take(1000) or len(docs) >= expected, f"{len(docs)} of {expected}"
        for batch in unacked:
            await batch.ack.ack()
        await wait_until(lambda: source.snapshot_done, 10, "the snapshot noted as done")
    finally:
        await source.close()

    assert len(ids) == len(set(ids)) == expected, "an id twice"
    reads = [d for d in docs if d["op"] == "read"]
    first_change = next(i for i, d in enumerate(docs) if d["op"] != "read")
    assert first_change == len(reads), "a streamed change came before the snapshot ended"
    # every row that existed at the slot's point once, with its values as of then
    read_a = [d["after"] for d in reads if d["table"] == a]
    assert sorted(r["id"] for r in read_a) == list(range(1, n_a + 1))
    assert [r["id"] for r in read_a] == list(range(1, n_a + 1)), "not in key order"
    assert all(r["v"] == 0 for r in read_a), "the snapshot saw a later update"
    read_b = {d["after"]["k"]: d for d in reads if d["table"] == b}
    assert len(read_b) == n_b and read_b["k1"]["after"] == {"k": "k1", "n": "1.5",
                                                             "arr": [1, 2]}
    assert read_b["k1"]["types"] == {"k": "text", "n": "numeric", "arr": "_int4"}
    assert {r["lsn"] for r in reads} == {reads[0]["lsn"]} and reads[0]["xid"] is None
    assert all(i.startswith(f"snapshot:{slot}:public.") for i, d in zip(ids, docs, strict=True)
               if d["op"] == "read")
    # the changes after it streamed, none lost
    ops = [(d["table"], d["op"]) for d in docs[first_change:]]
    assert ops.count((a, "update")) == 300 and ops.count((a, "delete")) == 100
    assert ops.count((a, "insert")) == 200 and (b, "update") in ops and (empty, "insert") in ops
    state = replay(docs, {b: "k"})
    assert state[a] == await contents(db, a, "id")
    assert state[empty] == await contents(db, empty, "id")
    assert state[b] == {k: {**r, "n": str(r["n"])}  # numeric as exact strings
                        for k, r in (await contents(db, b, "k")).items()}

    # done: a new instance streams, no snapshot again
    again = CdcSource.make_test_instance(dsn=postgres_dsn, slot=slot, tables=[a, b, empty],
                                         snapshot=True)
    await again.connect()
    try:
        assert again.snapshot_done
        await db.execute(f'INSERT INTO "{empty}" VALUES (2)')
        batch = None
        for _ in range(20):
            batch = await again.read_batch(100, 0.5)
            if batch is not None:
                break
        assert batch is not None
        assert [json.loads(m.data)["op"] for m in batch.messages] == ["insert"]
    finally:
        await again.close()


async def test_kill_9_mid_snapshot_then_restart_is_complete(
        nc: NATS, nats_url: str, postgres_dsn: str, db: asyncpg.Connection, unique: str,
        tables: Any, cdc_names: Any, tmp_path: Path) -> None:  # noqa: F811
    t = tables("snapk")
    n = 30_000 * SCALE
    await db.execute(f'CREATE TABLE "{t}" (id int8 PRIMARY KEY, v int NOT NULL, '
                     "pad text NOT NULL)")
    await db.execute(f"INSERT INTO \"{t}\" SELECT g, 0, repeat('p', 40) "
                     f"FROM generate_series(1, {n}) g")
    slot = cdc_names()
    stream = f"CDCS_{unique}"
    await create_stream(nc, stream, [f"snap{unique}.>"])
    pipeline = f"snap-{unique}"
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "postgres_cdc", "dsn": postgres_dsn, "slot": slot, "tables": [t],
                   "subject": f"snap{unique}.{{table}}.{{op}}", "include_types": False,
                   "snapshot": True},
        "sink": {"type": "jetstream", "servers": [nats_url]},
        # small batches, one in flight: the snapshot takes long enough to be cut
        "batch": {"max_messages": 100, "max_wait": "5ms"},
        "max_in_flight": 1,
    }])
    writing = True
    written = 0

    async def writer() -> None:
        nonlocal written
        conn = await asyncpg.connect(postgres_dsn)
        try:
            i = 0
            while writing:
                i += 1
                async with conn.transaction():
                    await conn.execute(f'UPDATE "{t}" SET v = v + 1 WHERE id = $1',
                                       1 + (i * 7919) % n)
                    await conn.execute(f'DELETE FROM "{t}" WHERE id = $1', n - i)
                    await conn.execute(f"INSERT INTO \"{t}\" VALUES ($1, 0, 'new')", n + i)
                written += 3
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    task: asyncio.Task[None] | None = None
    try:
        async with natsconn_process(file, log_name="first.log") as proc:
            task = asyncio.create_task(writer())
            await wait_until(lambda: _count_at_least(nc, stream, n // 4), 60,
                             f"{n // 4} snapshot rows in {stream}", 0.02)
            proc.signal(signal.SIGKILL)
            assert await proc.wait_exit(10) == -signal.SIGKILL
        first = await stream_count(nc, stream)
        assert first < n, f"the whole snapshot was through ({first}) before the kill"
        comment = await db.fetchval("SELECT obj_description(oid, 'pg_publication') FROM "
                                    "pg_publication WHERE pubname = $1", slot)
        assert f"snapshot-done:{slot}" not in (comment or "")
        async with natsconn_process(file, log_name="second.log") as proc:
            await asyncio.sleep(1.0)  # writes go on during the second snapshot too
            writing = False
            await task
            await wait_until(lambda: _marked_done(postgres_dsn, slot), 90,
                             "the snapshot noted as done")
            final = await contents(db, t, "id")
            await wait_until(lambda: _replayed_equal(nc, stream, t, final), 60,
                             "the stream replays to the table's contents")
            assert "snapshot at" in proc.log()
    finally:
        writing = False
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
    messages = await read_stream(nc, stream)
    ids = [m.headers["Nats-Msg-Id"] for m in messages if m.headers]
    assert len(ids) == len(messages) and len(set(ids)) == len(ids), "an id twice"
    docs = [json.loads(m.data) for m in messages]
    reads = [d for d in docs if d["op"] == "read"]
    assert {d["after"]["id"] for d in reads} >= set(range(1, n - written // 3 - 1)), \
        "a row that was never changed is missing from the snapshots"
    print(f"\n[cdc snapshot] {n} rows, kill -9 after {first} messages, {written} changes "
          f"written meanwhile: {len(messages)} in the stream ({len(reads)} reads, "
          f"{len(reads) - n} read twice because changed between the snapshots), "
          "replayed equal to the table")


async def _count_at_least(nc: NATS, stream: str, n: int) -> bool:
    return await stream_count(nc, stream) >= n


async def _marked_done(dsn: str, slot: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        comment = await conn.fetchval("SELECT obj_description(oid, 'pg_publication') FROM "
                                      "pg_publication WHERE pubname = $1", slot)
    finally:
        await conn.close()
    return f"snapshot-done:{slot}" in (comment or "")


async def _replayed_equal(nc: NATS, stream: str, table: str,
                          final: dict[Any, dict[str, Any]]) -> bool:
    docs = [json.loads(m.data) for m in await read_stream(nc, stream)]
    return replay(docs).get(table, {}) == final
