"""Issue 14, item 4: ``postgres_cdc`` → JetStream, on the real servers.

* The must-show: inserts, updates and deletes over 4 tables from 4 concurrent
  writers; ``kill -9`` of ``natsconn run`` twice and a PostgreSQL restart
  during the run; every change in the stream exactly once (by id, and by its
  content), in commit order per table; and, sampled all through the run, the
  slot's confirmed LSN never ahead of what the stream holds.
  CI runs 10 % of the issue's workload (10,000 inserts, 2,000 updates, 500
  deletes); ``NATSCONN_CDC_FULL=1`` runs all of it (100,000 / 20,000 / 5,000).
* Bad input: a table without primary key or replica identity, a missing
  publication, a slot dropped mid-run, wrong credentials: each a clear error
  naming the pipeline, ``/readyz`` 503, no slot advanced or made.
* In-process: TOAST columns left unchanged, REPLICA IDENTITY FULL, batches
  acknowledged out of order, the lag measurement and its warning.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from natsconn_postgres.cdc import CdcSource
from natsconn_postgres.pgoutput import parse_lsn

from ..helpers import (
    create_stream,
    natsconn_process,
    pipeline_file,
    read_stream,
    stream_count,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

ROOT = Path(__file__).resolve().parents[3]
FULL = os.environ.get("NATSCONN_CDC_FULL") == "1"
SCALE = 1.0 if FULL else 0.1
TABLES, WRITERS = 4, 4
INSERTS, UPDATES, DELETES = int(100_000 * SCALE), int(20_000 * SCALE), int(5_000 * SCALE)
PER_TX = 50


async def drop_slot(conn: asyncpg.Connection, slot: str) -> None:
    for _ in range(100):
        try:
            await conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                               "pg_replication_slots WHERE slot_name = $1", slot)
            return
        except asyncpg.ObjectInUseError:
            await conn.execute("SELECT pg_terminate_backend(active_pid) FROM "
                               "pg_replication_slots WHERE slot_name = $1", slot)
            await asyncio.sleep(0.1)
    raise AssertionError(f"slot {slot} stayed in use")


@pytest.fixture
async def cdc_names(postgres_dsn: str, unique: str) -> Any:
    """A slot/publication name per test, and every one dropped at the end."""
    made: list[str] = []

    def name(stem: str = "cdc") -> str:
        made.append(f"{stem}_{unique}".lower())
        return made[-1]

    yield name
    conn = await asyncpg.connect(postgres_dsn)
    try:
        for n in made:
            await drop_slot(conn, n)
            await conn.execute(f'DROP PUBLICATION IF EXISTS "{n}"')
    finally:
        await conn.close()


def restart_postgres() -> None:
    subprocess.run([str(ROOT / "scripts" / "services"), "restart", "postgres"], check=True,
                   capture_output=True, timeout=120)


# --------------------------------------------------------------- the workload


class Workload:
    """What the writers did, as the set of changes the stream must hold."""

    def __init__(self, tables: list[str]) -> None:
        self.tables = tables
        self.expected: set[tuple[str, str, int, int]] = set()  # table, op, id, version
        self.go = asyncio.Event()  # cleared while PostgreSQL restarts
        self.go.set()
        self.idle = [asyncio.Event() for _ in range(WRITERS)]

    async def writer(self, dsn: str, w: int) -> None:
        """Writer ``w`` owns rows ``w*10^7 + i`` in every table: inserts them,
        then updates some (version 1, 2, ...) and deletes some, in transactions
        of PER_TX changes that mix the tables."""
        per_table_ins = INSERTS // (WRITERS * TABLES)
        per_table_upd = UPDATES // (WRITERS * TABLES)
        per_table_del = DELETES // (WRITERS * TABLES)
        plan: list[tuple[str, str, int, int]] = []
        for t in self.tables:
            base = w * 10_000_000
            plan += [(t, "insert", base + i, 0) for i in range(per_table_ins)]
        for t in self.tables:
            base = w * 10_000_000
            plan += [(t, "update", base + (i % per_table_ins), 1 + i // per_table_ins)
                     for i in range(per_table_upd)]
            plan += [(t, "delete", base + per_table_ins - 1 - i, 0)
                     for i in range(per_table_del)]
        # interleave tables within a transaction, keep each row's own order
        conn = await asyncpg.connect(dsn)
        try:
            for first in range(0, len(plan), PER_TX):
                if not self.go.is_set():
                    self.idle[w].set()
                    await self.go.wait()
                    self.idle[w].clear()
                    conn.terminate()  # the server restarted: this session is gone
                    conn = await asyncpg.connect(dsn)
                chunk = plan[first:first + PER_TX]
                async with conn.transaction():
                    for table, op, row, version in chunk:
                        if op == "insert":
                            await conn.execute(
                                f'INSERT INTO "{table}" (id, v, w, note) VALUES ($1, 0, $2, $3)',
                                row, w, f"row {row}")
                        elif op == "update":
                            await conn.execute(f'UPDATE "{table}" SET v = $2 WHERE id = $1',
                                               row, version)
                        else:
                            await conn.execute(f'DELETE FROM "{table}" WHERE id = $1', row)
                self.expected.update(chunk)
                await asyncio.sleep(0.002)
        finally:
            self.idle[w].set()
            await conn.close()

    async def pause(self) -> None:
        self.go.clear()
        await asyncio.gather(*(e.wait() for e in self.idle))


def change_of(data: dict[str, Any]) -> tuple[str, str, int, int]:
    row = data["after"] if data["op"] != "delete" else data["before"]
    version = row["v"] if data["op"] == "update" else 0
    return data["table"], data["op"], row["id"], version


async def test_cdc_to_jetstream_exactly_once_through_two_kills_and_a_postgres_restart(
        nc: NATS, nats_url: str, postgres_dsn: str, db: asyncpg.Connection, unique: str,
        tables: Any, cdc_names: Any, tmp_path: Path) -> None:
    names = [tables(f"cdc{i}") for i in range(TABLES)]
    for t in names:
        await db.execute(f'CREATE TABLE "{t}" (id int8 PRIMARY KEY, v int NOT NULL, '
                         "w int NOT NULL, note text)")
    slot = cdc_names()
    stream = f"CDC_{unique}"
    await create_stream(nc, stream, [f"cdc{unique}.>"])
    pipeline = f"cdc-{unique}"
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "postgres_cdc", "dsn": postgres_dsn, "slot": slot,
                   "tables": names, "subject": f"cdc{unique}.{{table}}",
                   "include_types": False},
        "sink": {"type": "jetstream", "servers": [nats_url]},
        "batch": {"max_messages": 500, "max_wait": "5ms"},
    }])
    work = Workload(names)
    total = INSERTS // (WRITERS * TABLES) * WRITERS * TABLES + UPDATES // (
        WRITERS * TABLES) * WRITERS * TABLES + DELETES // (WRITERS * TABLES) * WRITERS * TABLES
    samples: list[tuple[int, int]] = []  # (slot confirmed LSN, stream messages after it)
    sampling = True

    async def sample() -> None:
        while sampling:
            try:
                conn = await asyncpg.connect(postgres_dsn, timeout=2)
                try:
                    while sampling:
                        lsn = await conn.fetchval(
                            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                            "WHERE slot_name = $1", slot)
                        count = await stream_count(nc, stream)
                        if lsn is not None:
                            samples.append((parse_lsn(lsn), count))
                        await asyncio.sleep(0.2)
                finally:
                    conn.terminate()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError, TimeoutError):
                await asyncio.sleep(0.3)  # the server restarts

    started = time.monotonic()
    sampler = asyncio.create_task(sample())
    writers: list[asyncio.Task[None]] = []
    kills = 0
    pg_restarted = False
    try:
        for fraction in (0.2, 0.5, 0.75):
            async with natsconn_process(file, log_name=f"run{fraction}.log") as proc:
                if not writers:  # the first run made the slot: from now on nothing is missed
                    writers += [asyncio.create_task(work.writer(postgres_dsn, w))
                                for w in range(WRITERS)]
                if fraction == 0.5:
                    await _wait_stream(nc, stream, int(total * 0.45), writers=writers)
                    await work.pause()
                    await asyncio.to_thread(restart_postgres)
                    pg_restarted = True
                    work.go.set()
                await _wait_stream(nc, stream, int(total * fraction), writers=writers)
                proc.signal(signal.SIGKILL)
                assert await proc.wait_exit(10) == -signal.SIGKILL
                kills += 1
        await asyncio.gather(*writers)
        async with natsconn_process(file, log_name="final.log"):
            await _wait_stream(nc, stream, total, timeout=120)
            # what the slot confirms catches up with the stream
            await wait_until(lambda: _slot_caught_up(postgres_dsn, slot), 30,
                             "the slot's confirmed LSN passes the last transaction")
            await asyncio.sleep(1.0)  # a late duplicate would show now
    finally:
        sampling = False
        for task in writers:
            task.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        await sampler
    assert kills == 3 and pg_restarted  # kill -9 at 20 %, 50 % (after the restart), 75 %
    assert len(work.expected) == total
    messages = await read_stream(nc, stream)
    elapsed = time.monotonic() - started
    ids = [m.headers.get("Nats-Msg-Id") if m.headers else None for m in messages]
    assert None not in ids
    assert len(set(ids)) == len(ids), f"{len(ids) - len(set(ids))} duplicate ids in the stream"
    docs = [json.loads(m.data) for m in messages]
    got = [change_of(d) for d in docs]
    assert len(got) == total and set(got) == work.expected, (
        f"{len(got)} changes in the stream ({len(set(got))} distinct) for {total} made; "
        f"missing {len(work.expected - set(got))}, unexpected {len(set(got) - work.expected)}")
    # commit order per table: commit LSNs never go back, positions rise within one
    per_table: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for m, d in zip(messages, docs, strict=True):
        lsn, _, pos = m.headers["Nats-Msg-Id"].partition(":")
        assert lsn == d["lsn"]
        per_table[d["table"]].append((parse_lsn(lsn), int(pos)))
    for table, order in per_table.items():
        assert order == sorted(order), f"{table}: changes out of commit order in the stream"
    # the slot never confirmed what the stream did not hold yet: every change of a
    # transaction committed before the confirmed LSN is among the messages the
    # stream held when it was sampled (just after the LSN)
    by_lsn = sorted((parse_lsn(d["lsn"]), i + 1) for i, d in enumerate(docs))
    lsns = [lsn for lsn, _ in by_lsn]
    reach: list[int] = []
    for _, seq in by_lsn:
        reach.append(max(seq, reach[-1] if reach else 0))
    checked = 0
    for confirmed, count in samples:
        k = bisect.bisect_left(lsns, confirmed)
        if k == 0:
            continue
        assert count >= reach[k - 1], (
            f"the slot confirmed {confirmed:X} while the stream held {count} messages; the "
            f"transactions committed before it reach message {reach[k - 1]}")
        checked += 1
    assert checked > 10, f"only {checked} samples of the slot's confirmed LSN"
    print(f"\n[cdc] {total} changes ({INSERTS} inserts, {UPDATES} updates, {DELETES} deletes) "
          f"over {TABLES} tables from {WRITERS} writers, kill -9 x{kills}, a PostgreSQL "
          f"restart: {len(got)} in the stream, each once, in commit order per table; "
          f"{checked} slot samples never ahead; {elapsed:.1f}s")


async def _wait_stream(nc: NATS, stream: str, count: int, timeout: float = 90,
                       writers: list[asyncio.Task[None]] | None = None) -> None:
    last = 0

    async def enough() -> bool:
        nonlocal last
        for task in writers or []:
            if task.done() and task.exception() is not None:
                raise AssertionError(f"a writer failed: {task.exception()!r}")
        last = await stream_count(nc, stream)
        return last >= count

    try:
        await wait_until(enough, timeout, f"{count} messages in {stream}", 0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (has {last})") from None


async def _slot_caught_up(dsn: str, slot: str) -> bool:
    db = await asyncpg.connect(dsn)  # the test's own session died with the restart
    try:
        lag = await db.fetchval(
            "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots "
            "WHERE slot_name = $1", slot)
    finally:
        await db.close()
    # the WAL goes on (other tests, checkpoints): caught up = within a few records
    return lag is not None and lag < 1 << 16


# ----------------------------------------------------------------- bad input


def _cdc_file(tmp_path: Path, pipeline: str, source: dict[str, Any], nats_url: str,
              stream_subject: str) -> Path:
    return pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "postgres_cdc", "subject": stream_subject + ".{table}",
                   "connect_timeout": "3s", **source},
        "sink": {"type": "jetstream", "servers": [nats_url]},
    }], restart_backoff="200ms", restart_backoff_max="1s")


async def _refused(file: Path, pipeline: str, *texts: str) -> str:
    """natsconn runs, the pipeline never gets ready: /readyz 503 and the log
    names the pipeline and says why."""
    async with natsconn_process(file, ready=False) as proc:
        def said() -> bool:
            log = proc.log()
            return all(t in log for t in texts) and f"pipeline '{pipeline}'" in log
        try:
            await wait_until(said, 30, f"the log says {texts}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{proc.log()[-3000:]}") from None
        status, state = await proc.readyz()
        assert status == 503, f"/readyz {status} {state}"
        await asyncio.sleep(1.0)
        status, state = await proc.readyz()
        assert status == 503, f"/readyz {status} {state} a second later"
        return proc.log()


async def _slot_exists(db: asyncpg.Connection, slot: str) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM pg_replication_slots "
                                  "WHERE slot_name = $1", slot))


async def test_table_without_primary_key_or_identity_is_refused(
        nc: NATS, nats_url: str, postgres_dsn: str, db: asyncpg.Connection, unique: str,
        tables: Any, cdc_names: Any, tmp_path: Path) -> None:
    table, slot = tables("nopk"), cdc_names()
    await db.execute(f'CREATE TABLE "{table}" (a int, b text)')
    file = _cdc_file(tmp_path, f"nopk-{unique}", {"dsn": postgres_dsn, "slot": slot,
                                                   "tables": [table]}, nats_url, f"c{unique}")
    await _refused(file, f"nopk-{unique}", f"public.{table}", "neither a primary key nor a "
                   "replica identity", "missing_identity: warn")
    assert not await _slot_exists(db, slot), "a slot was made for a refused pipeline"


async def test_missing_publication_is_refused(
        nc: NATS, nats_url: str, postgres_dsn: str, db: asyncpg.Connection, unique: str,
        tables: Any, cdc_names: Any, tmp_path: Path) -> None:
    table, slot = tables("nopub"), cdc_names()
    await db.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
    file = _cdc_file(tmp_path, f"nopub-{unique}", {
        "dsn": postgres_dsn, "slot": slot, "publication": f"missing_{unique}",
        "create_publication": False}, nats_url, f"c{unique}")
    await _refused(file, f"nopub-{unique}", f"publication 'missing_{unique}' does not exist")
    assert not await _slot_exists(db, slot)


async def test_wrong_credentials_are_refused(
        nc: NATS, nats_url: str, postgres_dsn: str, db: asyncpg.Connection, unique: str,
        cdc_names: Any, tmp_path: Path) -> None:
    slot = cdc_names()
    file = _cdc_file(tmp_path, f"cred-{unique}", {
        "dsn": postgres_dsn, "password": "not-the-password", "slot": slot}, nats_url,
        f"c{unique}")
    await _refused(file, f"cred-{unique}", "password authentication failed")
    assert not await _slot_exists(db, slot)


async def test_slot_dropped_mid_run_stops_the_pipeline(
        nc: NATS, nats_url: str, postgres_dsn: str, db: asyncpg.Connection, unique: str,
        tables: Any, cdc_names: Any, tmp_path: Path) -> None:
    table, slot = tables("dropped"), cdc_names()
    await db.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
    stream = f"CDCD_{unique}"
    await create_stream(nc, stream, [f"c{unique}.>"])
    pipeline = f"drop-{unique}"
    file = _cdc_file(tmp_path, pipeline, {"dsn": postgres_dsn, "slot": slot,
                                          "tables": [table], "lag_interval": "500ms"},
                     nats_url, f"c{unique}")
    async with natsconn_process(file) as proc:
        await db.execute(f'INSERT INTO "{table}" SELECT generate_series(1, 5)')
        await _wait_stream(nc, stream, 5, timeout=20)
        await drop_slot(db, slot)
        await db.execute(f'INSERT INTO "{table}" SELECT generate_series(6, 10)')

        def said() -> bool:
            return "the slot no longer exists, though natsconn created it" in proc.log()
        try:
            await wait_until(said, 30, "the restarted pipeline refuses to make a new slot")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{proc.log()[-3000:]}") from None
        assert "was dropped" in proc.log() and f"pipeline '{pipeline}'" in proc.log()
        status, state = await proc.readyz()
        assert status == 503, f"/readyz {status} {state}"
        assert not await _slot_exists(db, slot), "the slot was made again silently"
    assert await stream_count(nc, stream) == 5


# ---------------------------------------------------------------- in process


async def _read(source: CdcSource, n: int, timeout: float = 10.0, *, ack: bool = True
                ) -> list[Any]:
    from connector.testing.kit import collect_batches
    batches = await collect_batches(source, n, timeout, max_messages=n)
    if ack:
        for b in batches:
            await b.ack.ack()
    return batches


async def test_toast_unchanged_replica_identity_full_and_types(
        postgres_dsn: str, db: asyncpg.Connection, tables: Any, cdc_names: Any) -> None:
    table, slot = tables("toast"), cdc_names()
    await db.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, v int, big text, '
                     "n numeric, j jsonb, b bytea, ts timestamptz, arr text[], flag bool)")
    source = CdcSource.make_test_instance(dsn=postgres_dsn, slot=slot, tables=[table],
                                          commit_marker=True)
    await source.connect()
    try:
        big = "".join(f"{i:08x}" for i in range(20_000))  # 160 kB, stored out of line
        await db.execute(
            f'INSERT INTO "{table}" VALUES (1, 0, $1, 12.3400, \'{{"a": [1, 2]}}\', '
            "'\\x00ff', '2024-05-01 12:00:00.5+02', '{\"x y\",NULL}', true)", big)
        await db.execute(f'UPDATE "{table}" SET v = 1 WHERE id = 1')
        await db.execute(f'ALTER TABLE "{table}" REPLICA IDENTITY FULL')
        await db.execute(f'UPDATE "{table}" SET v = 2 WHERE id = 1')
        await db.execute(f'DELETE FROM "{table}" WHERE id = 1')
        batches = await _read(source, 8)
        docs = [json.loads(m.data) for b in batches for m in b.messages]
        ops = [d["op"] for d in docs]
        assert ops == ["insert", "commit", "update", "commit", "update", "commit", "delete",
                       "commit"], ops
        ins, upd, full, dele = docs[0], docs[2], docs[4], docs[6]
        assert ins["after"] == {"id": 1, "v": 0, "big": big, "n": "12.3400", "j": {"a": [1, 2]},
                                "b": "AP8=", "ts": "2024-05-01T10:00:00.5+00:00",
                                "arr": ["x y", None], "flag": True}
        assert ins["types"]["arr"] == "_text" and ins["types"]["n"] == "numeric"
        # default identity: the unchanged TOASTed value is not sent, and said so
        assert upd["unchanged_toast"] == ["big"] and "big" not in upd["after"]
        assert upd["before"] is None and upd["after"]["v"] == 1
        # FULL: the whole old row
        assert full["before"]["v"] == 1 and full["before"]["big"] == big
        assert dele["before"]["id"] == 1 and dele["before"]["big"] == big
        assert docs[1]["changes"] == 1 and docs[1]["lsn"] == ins["lsn"]
        assert [m.id for m in batches[0].messages][:2] == [f"{ins['lsn']}:1",
                                                           f"{ins['lsn']}:commit"]
    finally:
        await source.close()


async def test_out_of_order_acks_do_not_move_the_slot_past_an_unacked_batch(
        postgres_dsn: str, db: asyncpg.Connection, tables: Any, cdc_names: Any) -> None:
    table, slot = tables("order"), cdc_names()
    await db.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
    source = CdcSource.make_test_instance(dsn=postgres_dsn, slot=slot, tables=[table])
    await source.connect()

    async def slot_lsn() -> int:
        await asyncio.sleep(0.3)  # the status update travels
        return parse_lsn(await db.fetchval("SELECT confirmed_flush_lsn::text FROM "
                                           "pg_replication_slots WHERE slot_name = $1", slot))
    try:
        await db.execute(f'INSERT INTO "{table}" VALUES (1)')
        (a,) = await _read(source, 1, ack=False)
        await db.execute(f'INSERT INTO "{table}" VALUES (2)')
        (b,) = await _read(source, 1, ack=False)
        first = parse_lsn(json.loads(a.messages[0].data)["lsn"])
        second = parse_lsn(json.loads(b.messages[0].data)["lsn"])
        await b.ack.ack()
        assert source.confirmed <= first and await slot_lsn() <= first, (
            "the slot moved past a batch not acknowledged")
        await a.ack.ack()
        assert source.confirmed > first and await slot_lsn() == source.confirmed
        assert await source.read_batch(10, 0.5) is None  # decodes the second commit
        assert source.confirmed > second and await slot_lsn() == source.confirmed
    finally:
        await source.close()
    # a new instance does not see them again
    again = CdcSource.make_test_instance(dsn=postgres_dsn, slot=slot, tables=[table])
    await again.connect()
    try:
        await db.execute(f'INSERT INTO "{table}" VALUES (3)')
        docs = [json.loads(m.data) for b in await _read(again, 5, 3.0) for m in b.messages]
        assert [d["after"]["id"] for d in docs] == [3]
    finally:
        await again.close()


async def test_retained_wal_is_measured_and_warned_about(
        postgres_dsn: str, db: asyncpg.Connection, tables: Any, cdc_names: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    table, slot = tables("lag"), cdc_names()
    await db.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, pad text)')
    source = CdcSource.make_test_instance(dsn=postgres_dsn, slot=slot, tables=[table],
                                          lag_interval="200ms", lag_warning="64KiB")
    await source.connect()
    try:
        await db.execute(f"INSERT INTO \"{table}\" SELECT g, repeat('x', 500) "
                         "FROM generate_series(1, 2000) g")
        with caplog.at_level(logging.WARNING):
            await wait_until(lambda: (source.retained_bytes or 0) > 64 * 1024, 10,
                             "the lag measured above lag_warning")
            await wait_until(lambda: "retains" in caplog.text, 5, "the lag warning")
        assert "lag_warning" in caplog.text
    finally:
        await source.close()


async def test_retained_wal_is_the_source_lag_bytes_gauge(
        postgres_dsn: str, db: asyncpg.Connection, tables: Any, cdc_names: Any,
        unique: str) -> None:
    """``natsconn_source_lag_bytes{pipeline}`` on /metrics is the slot's retained WAL:
    it grows while the sink holds batches unacknowledged (the slot cannot move), and
    falls back once they are acknowledged."""
    from connector import PluginContext
    from connector.ops.metrics import REGISTRY, PluginMeters

    pipeline = f"lag-{unique}"
    log = logging.getLogger("test.cdc.lag")
    context = PluginContext(pipeline, "source", "test", log,
                            PluginMeters(pipeline, "source", log))
    table, slot = tables("lagm"), cdc_names()
    await db.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, pad text)')
    source = CdcSource.make_test_instance(context, dsn=postgres_dsn, slot=slot,
                                          tables=[table], lag_interval="200ms")

    def gauge() -> float:
        value = REGISTRY.get_sample_value("natsconn_source_lag_bytes", {"pipeline": pipeline})
        return -1.0 if value is None else value

    await source.connect()
    try:
        await wait_until(lambda: gauge() >= 0, 5, "the gauge set once")
        held = []  # read, never acknowledged: a stalled sink
        for step in range(3):
            await db.execute(f"INSERT INTO \"{table}\" SELECT g, repeat('x', 500) FROM "
                             f"generate_series({step * 1000 + 1}, {step * 1000 + 1000}) g")
            held += await _read(source, 1000, ack=False)
            before = gauge()
            await wait_until(lambda before=before: gauge() > before + 400_000, 10,
                             "the gauge grows with each unacknowledged transaction")
        grown = gauge()
        assert grown == source.retained_bytes and grown > 1_200_000, grown
        for b in held:
            await b.ack.ack()
        assert await source.read_batch(10, 0.5) is None  # decodes the last commit
        await wait_until(lambda: gauge() < 1 << 16, 10,
                         "the gauge falls once the sink confirmed")
    finally:
        await source.close()
