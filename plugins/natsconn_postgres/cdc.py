"""The ``postgres_cdc`` source: row changes from logical replication (``pgoutput``).

One replication slot and one publication. The source streams from the slot
on a replication connection of its own (:mod:`.replication`), decodes
``pgoutput`` (:mod:`.pgoutput`, values by :mod:`.pgtypes`) into one JSON
message per row change, in commit order, and moves the slot's confirmed
flush LSN only past transactions whose every message the sink confirmed:

* each batch handed to the engine is an entry in a queue, in read order;
* a transaction's commit LSN (its end LSN) is attached to the entry holding
  its last message (or the newest entry when it was read later);
* when an entry is acknowledged, the queue is popped from the front while the
  front is acknowledged, and the highest LSN popped is sent to the server as a
  standby status update. An acknowledged batch behind an unacknowledged one
  moves nothing.

After a crash the server resends every transaction past the confirmed LSN;
``Message.id`` (``<commit LSN>:<position in the transaction>``) is the same
then, so a JetStream sink with dedupe stores each change once.

``snapshot: true`` first reads every published table's rows as ``op: read``
messages from the snapshot the slot's creation exported (:mod:`.snapshot`),
and sends START_REPLICATION only after the last row; until the sink confirmed
every row (noted in the publication's comment) a restart takes it again,
from a temporary slot's snapshot, and streams from the slot as before.

Backpressure: frames are read from the socket only inside ``read_batch``,
through a bounded buffer; when the engine stops asking, TCP stops the
walsender. A standby status update goes out every ``status_interval`` in any
case, so the server does not time the idle reader out.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import string
import time
from collections import deque
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import asyncpg
import orjson
from pydantic import Field, field_validator, model_validator

from connector import (
    Batch,
    ByteSize,
    CallbackAck,
    ConnectorError,
    Duration,
    Message,
    RetryableError,
    Source,
)

from . import pgoutput as pgo
from . import snapshot as snap
from .connection import (
    PostgresConnectionConfig,
    connect_error,
    open_connection,
    open_pool,
    pg_error_text,
    quote_ident,
    quote_table,
    split_table,
)
from .pgtypes import Convert, TypeRegistry
from .replication import PgError, ProtocolError, ReplicationConnection

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_SUBJECT_FIELDS = frozenset({"schema", "table", "op"})
_MARKER = "natsconn postgres_cdc slots:"
_DONE = "snapshot-done:"  # a marker token: the slot's snapshot was confirmed by the sink


class CdcError(ConnectorError):
    """A CDC problem no retry cures: a missing publication or slot, a table
    without replica identity, a stream that cannot be decoded."""


class Numeric(StrEnum):
    string = "string"
    number = "number"


class MissingIdentity(StrEnum):
    error = "error"
    warn = "warn"


def _check_subject(text: str) -> str:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise ValueError(f"subject template {text!r}: {exc}") from None
    unknown = [f for f in fields if f not in _SUBJECT_FIELDS]
    if unknown:
        raise ValueError(f"subject template {text!r}: unknown placeholder(s) "
                         f"{', '.join('{' + f + '}' for f in unknown)}; expected {{schema}}, "
                         "{table}, {op}")
    return text


class CdcSourceConfig(PostgresConnectionConfig):
    slot: str | None = Field(None, description="replication slot name ([a-z0-9_]); default "
                             "natsconn_<pipeline name>")
    publication: str | None = Field(None, description="publication to stream; default: the "
                                    "slot's name")
    tables: list[str] = Field(default_factory=list, description="tables for a publication "
                              "created here ('name' or 'schema.name'); empty: FOR ALL TABLES "
                              "(superuser). With an existing publication, each must be in it")
    create_slot: bool = Field(True, description="create the slot when missing (logical, "
                              "pgoutput); false: a missing slot is an error")
    create_publication: bool = Field(True, description="create the publication when missing; "
                                     "false: a missing publication is an error")
    recreate_slot: bool = Field(False, description="create the slot again although natsconn "
                                "created it before and it was dropped (the changes in between "
                                "are lost); default: refuse, naming the slot")
    subject: str = Field("cdc.{schema}.{table}", description="subject template; "
                         "placeholders {schema}, {table}, {op}")
    snapshot: bool = Field(False, description="before streaming, every row of the published "
                           "tables as an op 'read' message, consistent with the slot's start "
                           "point; taken again after a restart until the sink confirmed every "
                           "row (then noted in the publication's comment)")
    commit_marker: bool = Field(False, description="after each transaction's changes, a "
                                "message with op 'commit' and the number of changes")
    commit_subject: str = Field("cdc.commit", description="subject of commit markers")
    numeric: Numeric = Field(Numeric.string, description="numeric columns as exact strings "
                             "(string) or JSON numbers (number)")
    include_types: bool = Field(True, description="a 'types' object: column -> type name")
    payload_column: str | None = Field(None, description="send this column's value (bytea: "
                                       "its bytes; else its text) as the message instead of "
                                       "the JSON change event; changes without it (deletes, "
                                       "truncates) stay JSON")
    missing_identity: MissingIdentity = Field(
        MissingIdentity.error, description="a published table without primary key or "
        "replica identity: error at connect (naming it), or warn and stream its inserts")
    read_buffer: ByteSize = Field(1 << 20, gt=0, description="most bytes read ahead from the "
                                  "replication connection")
    status_interval: Duration = Field(10.0, gt=0, description="standby status updates at "
                                      "least this often (also while the engine is busy)")
    lag_interval: Duration = Field(30.0, gt=0, description="how often the slot's retained "
                                   "WAL is measured")
    lag_warning: ByteSize = Field(1 << 30, gt=0, description="warn when the slot retains more "
                                  "WAL than this")

    @field_validator("subject", "commit_subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        return _check_subject(value)

    @model_validator(mode="after")
    def _names(self) -> CdcSourceConfig:
        for name in (self.slot, self.publication):
            if name is not None and not _SLOT_NAME.match(name):
                raise ValueError(f"expected a slot/publication name of lower-case letters, "
                                 f"digits and _ (at most 63), found {name!r}")
        for table in self.tables:
            split_table(table)
        return self


class _Entry:
    """One batch handed out: messages not yet acknowledged, and the LSN that may
    be confirmed once it and every entry before it are."""

    __slots__ = ("gen", "pending", "release", "snapshot")

    def __init__(self, gen: int, pending: int, snapshot: bool = False) -> None:
        self.gen = gen
        self.pending = pending
        self.release = 0
        self.snapshot = snapshot  # rows of the initial snapshot


class _Rel:
    """A relation and what decoding its tuples needs, built once per Relation message."""

    __slots__ = (
        "columns",
        "key_index",
        "payload_bytea",
        "payload_index",
        "rel",
        "subjects",
        "types",
    )

    def __init__(self, rel: pgo.Relation, types: TypeRegistry, subject: str,
                 payload_column: str | None) -> None:
        self.rel = rel
        self.columns: list[tuple[str, Convert]] = []
        self.types: dict[str, str] = {}
        for col in rel.columns:
            t = types.get(col.type_oid)
            self.columns.append((col.name, t.convert))
            self.types[col.name] = t.name
        self.key_index = [i for i, c in enumerate(rel.columns) if c.key]
        self.subjects = {op: subject.format(schema=rel.schema, table=rel.table, op=op)
                         for op in ("insert", "update", "delete", "truncate", "read")}
        self.payload_index: int | None = None
        self.payload_bytea = False
        if payload_column is not None:
            for i, c in enumerate(rel.columns):
                if c.name == payload_column:
                    self.payload_index = i
                    self.payload_bytea = self.types[c.name] == "bytea"


class _SnapshotRead:
    """The snapshot being read: its transaction, the temporary slot's connection
    (a re-taken snapshot), where it is, and its point and time."""

    __slots__ = ("point", "progress", "rels", "sql", "temp", "ts")

    def __init__(self, sql: asyncpg.Connection, temp: ReplicationConnection | None,
                 progress: snap.Progress, rels: list[_Rel], point: str,
                 ts: tuple[float, str]) -> None:
        self.sql = sql
        self.temp = temp
        self.progress = progress
        self.rels = rels
        self.point = point
        self.ts = ts


def _iso_now() -> tuple[float, str]:
    now = time.time()
    text = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
    return now, text


def _iso(micros_since_2000: int) -> tuple[float, str]:
    seconds = pgo.PG_EPOCH + micros_since_2000 / 1_000_000
    text = datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    return seconds, text


class CdcSource(Source[CdcSourceConfig]):
    """PostgreSQL change data capture: logical replication (pgoutput) through a slot.

    One JSON message per row change, in commit order; the slot advances only past
    what the sink confirmed."""

    Config = CdcSourceConfig

    def __init__(self, config: CdcSourceConfig, context: Any = None) -> None:
        super().__init__(config, context)
        pipeline = re.sub(r"[^a-z0-9_]", "_", self.context.pipeline.lower())
        self.slot = config.slot or f"natsconn_{pipeline}"[:63]
        self.publication = config.publication or self.slot
        self._conn: ReplicationConnection | None = None
        self._pool: asyncpg.Pool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._fatal: ConnectorError | None = None
        self.confirmed = 0  # the LSN last sent as flushed
        self.retained_bytes: int | None = None  # last measured slot lag (WAL bytes)
        self._snapshot_needed = False  # snapshot: true and not yet confirmed (connect)
        self.snapshot_done = False  # the sink confirmed every snapshot row; marker written
        self.snapshot_rows = 0  # rows read by the current snapshot
        self._snap: _SnapshotRead | None = None
        self._reset_stream()

    # -- errors

    def _name(self) -> str:
        return f"pipeline {self.context.pipeline!r}: postgres_cdc slot {self.slot!r}"

    def _error(self, text: str) -> CdcError:
        return CdcError(f"{self._name()}: {text}")

    # -- connect

    async def connect(self) -> None:
        cfg = self.config
        self._fatal = None
        self._types = TypeRegistry(numeric_as_number=cfg.numeric is Numeric.number)
        try:
            conn = await open_connection(cfg, self.context)
        except ConnectorError as exc:
            raise type(exc)(f"{self._name()}: {exc}") from None
        try:
            await self._prepare(conn)
        except asyncpg.PostgresError as exc:
            raise self._error(pg_error_text(exc)) from None
        except (OSError, asyncpg.InterfaceError) as exc:
            raise RetryableError(f"{self._name()}: {pg_error_text(exc)}") from None
        finally:
            await conn.close()
        self._pool = await open_pool(cfg, self.context, size=1)
        try:
            await self._open_stream()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._status_loop()),
                       loop.create_task(self._lag_loop())]

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        cfg = self.config
        log = self.context.logger
        wal_level = await conn.fetchval("SHOW wal_level")
        if wal_level != "logical":
            raise self._error(f"the server runs with wal_level = {wal_level}; logical "
                              "replication needs wal_level = logical (postgresql.conf, then a "
                              "restart)")
        can = await conn.fetchval(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user")
        if not can:
            raise self._error("the user has no REPLICATION privilege (ALTER ROLE "
                              f"{quote_ident(await conn.fetchval('SELECT current_user'))} "
                              "REPLICATION)")
        for table in cfg.tables:
            if await conn.fetchval("SELECT to_regclass($1)", quote_table(table)) is None:
                raise self._error(f"table {table} does not exist")
        pub = await conn.fetchrow(
            "SELECT oid, puballtables, pubupdate, pubdelete, obj_description(oid, "
            "'pg_publication') AS comment FROM pg_publication WHERE pubname = $1",
            self.publication)
        if pub is None:
            if not cfg.create_publication:
                raise self._error(f"publication {self.publication!r} does not exist (and "
                                  "create_publication is false): CREATE PUBLICATION "
                                  f"{quote_ident(self.publication)} FOR TABLE ...")
            what = ("FOR TABLE " + ", ".join(quote_table(t) for t in cfg.tables)
                    if cfg.tables else "FOR ALL TABLES")
            with contextlib.suppress(asyncpg.DuplicateObjectError):
                await conn.execute(f"CREATE PUBLICATION {quote_ident(self.publication)} {what}")
                log.info("created publication %s %s", self.publication, what)
            pub = await conn.fetchrow(
                "SELECT oid, puballtables, pubupdate, pubdelete, obj_description(oid, "
                "'pg_publication') AS comment FROM pg_publication WHERE pubname = $1",
                self.publication)
        published = await conn.fetch(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1",
            self.publication)
        have = {(r["schemaname"], r["tablename"]) for r in published}
        for table in cfg.tables:
            schema, name = split_table(table)
            if not any(t == name and (schema is None or s == schema) for s, t in have):
                raise self._error(f"table {table} is not in publication {self.publication!r}: "
                                  f"ALTER PUBLICATION {quote_ident(self.publication)} ADD "
                                  f"TABLE {quote_table(table)}")
        if pub["pubupdate"] or pub["pubdelete"]:
            bad = await conn.fetch("""
                SELECT pt.schemaname, pt.tablename FROM pg_publication_tables pt
                JOIN pg_namespace n ON n.nspname = pt.schemaname
                JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                WHERE pt.pubname = $1 AND (c.relreplident = 'n' OR (c.relreplident = 'd'
                  AND NOT EXISTS (SELECT 1 FROM pg_index i
                                  WHERE i.indrelid = c.oid AND i.indisprimary)))
                ORDER BY 1, 2""", self.publication)
            if bad:
                names = ", ".join(f"{r['schemaname']}.{r['tablename']}" for r in bad)
                text = (f"table(s) {names} in publication {self.publication!r} have neither a "
                        "primary key nor a replica identity: PostgreSQL refuses their UPDATEs "
                        "and DELETEs while published, and none could be decoded. Add a primary "
                        "key, or ALTER TABLE ... REPLICA IDENTITY FULL")
                if cfg.missing_identity is MissingIdentity.error:
                    raise self._error(text + " (or set missing_identity: warn)")
                log.warning("%s: %s", self._name(), text)
        self._types.load([(r[0], r[1], r[2], r[3], r[4]) for r in await conn.fetch(
            "SELECT t.oid::int8, CASE WHEN n.nspname IN ('pg_catalog', 'public') THEN t.typname "
            "ELSE n.nspname || '.' || t.typname END, t.typcategory::text, t.typelem::int8, "
            "t.typbasetype::int8 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace")])
        slot = await conn.fetchrow(
            "SELECT plugin, slot_type, database, wal_status FROM pg_replication_slots "
            "WHERE slot_name = $1", self.slot)
        tokens = _marked_slots(pub["comment"])
        created_before = self.slot in tokens
        self._publication_oid = int(pub["oid"])
        if slot is None:
            if created_before and not cfg.recreate_slot:
                raise self._error(
                    f"the slot no longer exists, though natsconn created it for publication "
                    f"{self.publication!r}: it was dropped, and the changes since are not "
                    "in its stream. Set recreate_slot: true to start again from now")
            if not cfg.create_slot:
                raise self._error("the replication slot does not exist (and create_slot is "
                                  "false): SELECT pg_create_logical_replication_slot("
                                  f"'{self.slot}', 'pgoutput')")
            self._create_slot_now = True
            self._publication_comment = pub["comment"]
        else:
            self._create_slot_now = False
            if slot["slot_type"] != "logical" or slot["plugin"] != "pgoutput":
                raise self._error(f"slot is a {slot['slot_type']} slot with plugin "
                                  f"{slot['plugin']!r}; expected logical with pgoutput")
            database = await conn.fetchval("SELECT current_database()")
            if slot["database"] != database:
                raise self._error(f"slot belongs to database {slot['database']!r}, not "
                                  f"{database!r}")
            if slot["wal_status"] == "lost":
                raise self._error("the slot's WAL was removed (max_slot_wal_keep_size): "
                                  "changes are lost; drop the slot and start again")
        # A new slot is a new starting point: its snapshot is taken whatever the marker
        # says; an existing one needs it until the sink confirmed every row of one.
        self.snapshot_done = (not self._create_slot_now
                              and f"{_DONE}{self.slot}" in tokens)
        self._snapshot_needed = cfg.snapshot and not self.snapshot_done
        if self._snapshot_needed and not await conn.fetchval(
                "SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE oid = $1",
                self._publication_oid):
            raise self._error(
                f"snapshot: true notes in the comment of publication {self.publication!r} "
                "when the sink has confirmed every snapshot row (so that a restart before "
                "that takes it again), and only the publication's owner may comment on it: "
                "connect as its owner, or create the publication with natsconn")

    def _settings(self) -> dict[str, str]:
        cfg = self.config
        name = cfg.application_name or f"natsconn:{self.context.pipeline}:{self.context.role}"
        return {"application_name": name[:63], "DateStyle": "ISO", "TimeZone": "UTC",
                "IntervalStyle": "iso_8601", "extra_float_digits": "3",
                "bytea_output": "hex"}

    async def _open_stream(self) -> None:
        """Replication connection, the slot if it is to be created, START_REPLICATION."""
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                conn = await ReplicationConnection.open(cfg, self._settings(),
                                                        limit=max(1 << 16, cfg.read_buffer))
        except PgError as exc:
            if exc.sqlstate.startswith("28") or exc.sqlstate in ("3D000", "57P03"):
                raise connect_error(cfg, exc) from None  # credentials, database, starting
            raise self._error(str(exc)) from None
        except (OSError, TimeoutError, EOFError, asyncio.IncompleteReadError,
                ProtocolError) as exc:
            raise connect_error(cfg, exc) from None
        try:
            exported: tuple[str, str] | None = None
            if self._create_slot_now:
                exported = await self._create_slot(conn, export=self._snapshot_needed)
            if self._snapshot_needed:
                # The exported snapshot lives while this connection runs no other
                # command: START_REPLICATION waits until the last row is read.
                await self._begin_snapshot(exported)
            else:
                await self._start(conn)
        except BaseException:
            conn.abort()
            self._end_snapshot_read()
            raise
        self._conn = conn

    async def _create_slot(self, conn: ReplicationConnection, *, export: bool = False,
                           temporary: str | None = None) -> tuple[str, str] | None:
        """Create the slot (or, with ``temporary``, a temporary slot of that name
        only for its snapshot); with ``export`` its consistent point and the name of
        the snapshot it exported."""
        name = temporary or self.slot
        how = "EXPORT_SNAPSHOT" if export else "NOEXPORT_SNAPSHOT"
        kind = "TEMPORARY LOGICAL" if temporary else "LOGICAL"
        try:
            rows = await conn.query(f'CREATE_REPLICATION_SLOT "{name}" {kind} pgoutput {how}')
        except PgError as exc:
            if exc.sqlstate != "42710" or temporary:  # duplicate_object: made meanwhile
                raise self._error(f"cannot create the slot: {exc}") from None
            return None
        point = (rows[0].get("consistent_point") if rows else None) or "0/0"
        exported = rows[0].get("snapshot_name") if rows else None
        if temporary:
            assert exported is not None
            return point, exported
        self.context.logger.warning(
            "%s: created the replication slot at %s: changes from there on are streamed, "
            "earlier ones %s", self._name(), point,
            "are read by the snapshot" if export else "are not")
        self._create_slot_now = False
        # Remember on the publication that natsconn made this slot: should it be
        # dropped later, connect refuses to make a new one silently. A new slot's
        # snapshot is not done yet, whatever an earlier slot of the name did.
        try:
            await self._mark(add=[self.slot], remove=[f"{_DONE}{self.slot}"],
                             quiet=not export)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            raise RetryableError(f"{self._name()}: cannot note the new slot on publication "
                                 f"{self.publication!r}: {pg_error_text(exc)}") from None
        return (point, exported) if exported else None

    async def _mark(self, add: list[str], remove: list[str], quiet: bool = True) -> None:
        """Edit the marker tokens in the publication's comment, serialised between
        pipelines sharing the publication by an advisory lock."""
        assert self._pool is not None
        try:
            async with self._pool.acquire() as c, c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock(73536, hashtext($1))",
                                self.publication)
                comment = await c.fetchval(
                    "SELECT obj_description(oid, 'pg_publication') FROM pg_publication "
                    "WHERE pubname = $1", self.publication)
                tokens = [t for t in _marked_slots(comment) if t not in remove]
                tokens += [t for t in add if t not in tokens]
                text = f"{_MARKER} {' '.join(tokens)}"
                if text != comment:
                    await c.execute(f"COMMENT ON PUBLICATION "
                                    f"{quote_ident(self.publication)} IS '{text}'")
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            if not quiet:
                raise
            self.context.logger.info("cannot mark publication %s: %s", self.publication,
                                     pg_error_text(exc))

    # -- the initial snapshot

    async def _begin_snapshot(self, exported: tuple[str, str] | None) -> None:
        """Import the snapshot (the new slot's, else a temporary slot's made for it)
        into a REPEATABLE READ transaction, and list the tables to read."""
        cfg = self.config
        temp: ReplicationConnection | None = None
        sql: asyncpg.Connection | None = None
        try:
            if exported is None:
                # The slot exists (a restart before the snapshot was confirmed): a
                # temporary slot exports a snapshot at a later point; streaming from
                # the slot's confirmed LSN then repeats the changes in between, which
                # the rows already show (see docs: the state converges).
                async with asyncio.timeout(cfg.connect_timeout):
                    temp = await ReplicationConnection.open(cfg, self._settings())
                name = f"{self.slot[:48]}_snap_{secrets.token_hex(4)}"
                exported = await self._create_slot(temp, export=True, temporary=name)
                assert exported is not None
            point, name = exported
            sql = await open_connection(cfg, self.context)
            await snap.begin(sql, name)
            tables = await snap.published_tables(sql, self.publication)
        except BaseException as exc:
            if temp is not None:
                temp.abort()
            if sql is not None:
                sql.terminate()
            if isinstance(exc, asyncpg.PostgresError):
                raise self._error(f"cannot take the snapshot: {pg_error_text(exc)}") from None
            if isinstance(exc, OSError | EOFError | asyncio.IncompleteReadError | TimeoutError
                          | asyncpg.InterfaceError | ProtocolError):
                raise RetryableError(f"{self._name()}: snapshot: {pg_error_text(exc)}"
                                     ) from None
            raise
        rels = [_Rel(t.relation, self._types, cfg.subject, cfg.payload_column) for t in tables]
        self._snap = _SnapshotRead(sql, temp, snap.Progress(tables), rels, point,
                                   _iso_now())
        self.snapshot_rows = 0
        self._snap_unacked = 0
        self._snap_read = False
        self.context.logger.info("%s: snapshot at %s of %d table(s): %s", self._name(), point,
                                 len(tables), ", ".join(f"{t.relation.schema}."
                                                         f"{t.relation.table}" for t in tables))

    def _end_snapshot_read(self) -> None:
        s, self._snap = self._snap, None
        if s is None:
            return
        s.sql.terminate()  # a read-only transaction: nothing to commit
        if s.temp is not None:
            s.temp.abort()  # its temporary slot goes with the session

    async def _snapshot_batch(self, max_messages: int) -> Batch | None:
        s = self._snap
        assert s is not None
        progress = s.progress
        out: list[Message] = []
        while len(out) < max_messages and progress.index < len(progress.tables):
            table = progress.tables[progress.index]
            if progress.cursor is None:
                progress.cursor = await s.sql.cursor(table.query)
            want = max_messages - len(out)
            rows = await progress.cursor.fetch(want)
            rel = s.rels[progress.index]
            for row in rows:
                out.append(self._read_message(s, table, rel, row))
            key = f"{rel.rel.schema}.{rel.rel.table}"
            progress.per_table[key] = progress.per_table.get(key, 0) + len(rows)
            if len(rows) < want:  # a short fetch: the table is read
                progress.index += 1
                progress.cursor = None
        if not out:
            return None
        self.snapshot_rows += len(out)
        entry = _Entry(self._gen, len(out), snapshot=True)
        self._snap_unacked += len(out)
        self._entries.append(entry)
        return Batch(out, self._ack_handle(entry, out))

    def _read_message(self, s: _SnapshotRead, table: snap.Table, rel: _Rel,
                      row: Any) -> Message:
        cols = rel.columns
        after: dict[str, Any] = {}
        for i in range(len(cols)):
            text = row[i + 2]
            name, convert = cols[i]
            if text is None:
                after[name] = None
            else:
                try:
                    after[name] = convert(text)
                except (ValueError, IndexError, orjson.JSONDecodeError):
                    after[name] = text
        if table.id_columns:
            ident = orjson.dumps([row[i + 2] for i in table.id_columns]).decode()
        else:
            ident = row[1]  # ctid
        key = None
        if rel.key_index:
            key = orjson.dumps({cols[i][0]: after[cols[i][0]] for i in rel.key_index})
        data = None
        if rel.payload_index is not None:
            value = row[rel.payload_index + 2]
            if value is not None:
                data = bytes.fromhex(value[2:]) if rel.payload_bytea else value.encode()
        if data is None:
            doc: dict[str, Any] = {
                "op": "read", "schema": rel.rel.schema, "table": rel.rel.table,
                "lsn": s.point, "xid": None, "ts": s.ts[1], "before": None, "after": after}
            if self.config.include_types:
                doc["types"] = rel.types
            data = orjson.dumps(doc)
        return Message(data, rel.subjects["read"], key, timestamp=s.ts[0],
                       id=f"snapshot:{self.slot}:{rel.rel.schema}.{rel.rel.table}:{ident}"
                          f"@{row[0]}")

    async def _finish_snapshot(self) -> None:
        """Every row is read: close the snapshot, stream from the slot."""
        s = self._snap
        assert s is not None and self._conn is not None
        self.context.logger.info("%s: snapshot read: %d row(s); streaming from the slot",
                                 self._name(), self.snapshot_rows)
        self._end_snapshot_read()
        self._snap_read = True
        self._check_snapshot_done()
        await self._start(self._conn)

    def _check_snapshot_done(self) -> None:
        if self._snap_read and self._snap_unacked <= 0 and self._snapshot_needed:
            self._snapshot_needed = False
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._mark_snapshot_done()))

    async def _mark_snapshot_done(self) -> None:
        wait = 0.5
        while True:
            try:
                await self._mark(add=[f"{_DONE}{self.slot}"], remove=[], quiet=False)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                self.context.logger.warning("%s: cannot note the snapshot as done (retrying; "
                                            "a restart before this takes it again): %s",
                                            self._name(), pg_error_text(exc))
                await asyncio.sleep(wait)
                wait = min(wait * 2, 30.0)
                continue
            self.snapshot_done = True
            self.context.logger.info("%s: snapshot confirmed by the sink (%d rows); noted in "
                                     "publication %s", self._name(), self.snapshot_rows,
                                     self.publication)
            return

    async def _start(self, conn: ReplicationConnection) -> None:
        options = {"proto_version": "1", "publication_names": f'"{self.publication}"'}
        loop = asyncio.get_running_loop()
        until = loop.time() + max(5.0, self.config.connect_timeout)
        while True:
            try:
                await conn.start_replication(self.slot, options)
                return
            except PgError as exc:
                if exc.sqlstate == "55006" and loop.time() < until:
                    # the slot is active: most likely our previous session's walsender
                    # that has not noticed its client is gone yet
                    await asyncio.sleep(0.2)
                    continue
                if exc.sqlstate == "55006":
                    raise RetryableError(f"{self._name()}: {exc} (is another process "
                                         "streaming from this slot?)") from None
                if exc.sqlstate == "42704":
                    raise self._error(f"the replication slot was dropped ({exc})") from None
                raise self._error(f"START_REPLICATION failed: {exc}") from None

    # -- the stream

    def _reset_stream(self) -> None:
        self._gen = getattr(self, "_gen", 0) + 1
        self._entries: deque[_Entry] = deque()
        self._redeliver: deque[tuple[float, list[Message], _Entry]] = deque()
        self._frames: deque[tuple[int, int, Any]] = deque()
        self._rels: dict[int, _Rel] = {}
        self._in_txn = False
        self._txn_lsn = ""
        self._txn_xid = 0
        self._txn_pos = 0
        self._txn_ts = (0.0, "")
        self._snap_unacked = 0
        self._snap_read = False
        self._end_snapshot_read()

    async def _reconnect(self) -> None:
        self.context.meters.disconnected()
        if self._conn is not None:
            self._conn.abort()
            self._conn = None
        self._reset_stream()
        await self._open_stream()
        self.context.meters.reconnected()
        self.context.logger.info("%s: streaming again from the slot's confirmed LSN",
                                 self._name())

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        if self._fatal is not None:
            raise self._fatal
        if self._redeliver:
            batch = self._redelivery(max_messages)
            if batch is not None:
                return batch
        if self._conn is None:
            try:
                await self._reconnect()
            except ConnectorError as exc:
                if not isinstance(exc, RetryableError):
                    self._fatal = exc
                raise
        if self._snap is not None:
            try:
                batch = await self._snapshot_batch(max_messages)
                if batch is not None:
                    return batch
                await self._finish_snapshot()
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError,
                    ConnectorError) as exc:
                if self._conn is not None:
                    self._conn.abort()
                    self._conn = None
                self._end_snapshot_read()
                if isinstance(exc, ConnectorError):
                    if not isinstance(exc, RetryableError):
                        self._fatal = exc
                    raise
                raise RetryableError(f"{self._name()}: the snapshot was interrupted, it is "
                                     f"taken again: {pg_error_text(exc)}") from None
        conn = self._conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        out: list[Message] = []
        entry = _Entry(self._gen, 0)
        frames = self._frames
        try:
            while True:
                while frames and len(out) < max_messages:
                    self._handle(frames.popleft(), out, entry, conn)
                if out or len(out) >= max_messages:
                    break
                left = deadline - loop.time()
                if left <= 0:
                    break
                frames.extend(await conn.read_frames(left))
        except pgo.DecodeError as exc:
            self._fatal = self._error(f"cannot decode the replication stream: {exc}; the slot "
                                      f"stays at {pgo.lsn_text(self.confirmed)}")
            raise self._fatal from None
        except PgError as exc:
            self._conn = None
            conn.abort()
            if exc.sqlstate == "42704":
                self._fatal = self._error(f"the replication slot was dropped ({exc})")
                raise self._fatal from None
            raise RetryableError(f"{self._name()}: the server ended the stream: {exc}"
                                 ) from None
        except (OSError, EOFError, asyncio.IncompleteReadError, ConnectionError) as exc:
            self._conn = None
            conn.abort()
            raise RetryableError(f"{self._name()}: replication connection lost: "
                                 f"{exc or type(exc).__name__}") from None
        if not out:
            return None
        entry.pending = len(out)
        self._entries.append(entry)
        return Batch(out, self._ack_handle(entry, out))

    def _handle(self, frame: tuple[int, int, Any], out: list[Message], entry: _Entry,
                conn: ReplicationConnection) -> None:
        kind, lsn, payload = frame
        if kind == 0x6B:  # keepalive: everything before wal_end has been sent to us
            if not self._in_txn:
                self._release(lsn, out, entry)
            if payload:
                conn.send_status(self.confirmed)
            return
        msg = pgo.decode(payload)
        if isinstance(msg, pgo.Insert | pgo.Update | pgo.Delete):
            out.append(self._change(msg))
        elif isinstance(msg, pgo.Begin):
            self._in_txn = True
            self._txn_lsn = pgo.lsn_text(msg.final_lsn)
            self._txn_xid = msg.xid
            self._txn_pos = 0
            self._txn_ts = _iso(msg.commit_time)
        elif isinstance(msg, pgo.Commit):
            if self.config.commit_marker:
                out.append(self._marker())
            self._in_txn = False
            self._release(msg.end_lsn, out, entry)
        elif isinstance(msg, pgo.Relation):
            self._rels[msg.oid] = _Rel(msg, self._types, self.config.subject,
                                       self.config.payload_column)
        elif isinstance(msg, pgo.TypeInfo):
            self._types.add(msg.oid, msg.schema, msg.name)
        elif isinstance(msg, pgo.Truncate):
            for oid in msg.relations:
                out.append(self._truncate(oid, msg))
        # Origin and logical messages carry no row changes

    def _release(self, lsn: int, out: list[Message], entry: _Entry) -> None:
        """``lsn`` may be confirmed once every message read so far is acknowledged."""
        if out:
            entry.release = max(entry.release, lsn)
        elif self._entries:
            last = self._entries[-1]
            last.release = max(last.release, lsn)
        elif lsn > self.confirmed:
            self._confirm(lsn)

    def _confirm(self, lsn: int) -> None:
        self.confirmed = lsn
        if self._conn is not None:
            self._conn.send_status(lsn)

    def _rel(self, oid: int) -> _Rel:
        rel = self._rels.get(oid)
        if rel is None:
            raise pgo.DecodeError(f"a change of relation oid {oid} came before its Relation "
                                  "message")
        return rel

    def _row(self, rel: _Rel, values: list[pgo.Value], only: list[int] | None = None,
             unchanged: list[str] | None = None) -> dict[str, Any]:
        cols = rel.columns
        if len(values) != len(cols):
            raise pgo.DecodeError(
                f"{rel.rel.schema}.{rel.rel.table}: a tuple of {len(values)} columns for a "
                f"relation of {len(cols)} (DDL not announced by a Relation message)")
        row: dict[str, Any] = {}
        for i in (range(len(cols)) if only is None else only):
            value = values[i]
            name, convert = cols[i]
            if value is None:
                row[name] = None
            elif value is pgo.UNCHANGED:
                if unchanged is not None:
                    unchanged.append(name)
            else:
                assert isinstance(value, bytes)
                text = value.decode("utf-8")
                try:
                    row[name] = convert(text)
                except (ValueError, IndexError, orjson.JSONDecodeError):
                    row[name] = text
        return row

    def _change(self, msg: pgo.Insert | pgo.Update | pgo.Delete) -> Message:
        rel = self._rel(msg.relation)
        unchanged: list[str] = []
        before: dict[str, Any] | None = None
        after: dict[str, Any] | None = None
        if isinstance(msg, pgo.Insert):
            op = "insert"
            after = self._row(rel, msg.new, None, unchanged)
        elif isinstance(msg, pgo.Update):
            op = "update"
            after = self._row(rel, msg.new, None, unchanged)
            if msg.old is not None:
                before = self._row(rel, msg.old, rel.key_index if msg.old_kind == "K" else None)
        else:
            op = "delete"
            before = self._row(rel, msg.old, rel.key_index if msg.old_kind == "K" else None)
        return self._message(rel, op, before, after, unchanged, msg)

    def _message(self, rel: _Rel, op: str, before: dict[str, Any] | None,
                 after: dict[str, Any] | None, unchanged: list[str],
                 msg: pgo.Insert | pgo.Update | pgo.Delete | None) -> Message:
        self._txn_pos += 1
        doc: dict[str, Any] = {
            "op": op, "schema": rel.rel.schema, "table": rel.rel.table,
            "lsn": self._txn_lsn, "xid": self._txn_xid, "ts": self._txn_ts[1],
            "before": before, "after": after}
        if self.config.include_types:
            doc["types"] = rel.types
        if unchanged:
            doc["unchanged_toast"] = unchanged
        row = after if after is not None else before
        key = None
        if row is not None and rel.key_index:
            names = [rel.columns[i][0] for i in rel.key_index]
            if all(n in row for n in names):
                key = orjson.dumps({n: row[n] for n in names})
        data = None
        if rel.payload_index is not None and msg is not None and not isinstance(
                msg, pgo.Delete):
            value = msg.new[rel.payload_index]
            if isinstance(value, bytes):
                data = bytes.fromhex(value[2:].decode()) if rel.payload_bytea else value
        if data is None:
            data = orjson.dumps(doc)
        return Message(data, rel.subjects[op], key, timestamp=self._txn_ts[0],
                       id=f"{self._txn_lsn}:{self._txn_pos}")

    def _truncate(self, oid: int, msg: pgo.Truncate) -> Message:
        rel = self._rel(oid)
        self._txn_pos += 1
        doc = {"op": "truncate", "schema": rel.rel.schema, "table": rel.rel.table,
               "lsn": self._txn_lsn, "xid": self._txn_xid, "ts": self._txn_ts[1],
               "before": None, "after": None, "cascade": msg.cascade,
               "restart_identity": msg.restart_identity}
        return Message(orjson.dumps(doc), rel.subjects["truncate"], None,
                       timestamp=self._txn_ts[0], id=f"{self._txn_lsn}:{self._txn_pos}")

    def _marker(self) -> Message:
        doc = {"op": "commit", "lsn": self._txn_lsn, "xid": self._txn_xid,
               "ts": self._txn_ts[1], "changes": self._txn_pos}
        return Message(orjson.dumps(doc), self.config.commit_subject, None,
                       timestamp=self._txn_ts[0], id=f"{self._txn_lsn}:commit")

    # -- acknowledgements

    def _ack_handle(self, entry: _Entry, messages: list[Message]) -> CallbackAck:
        count = len(messages)

        async def ack() -> None:
            self._settle(entry, count)

        async def nack(delay: float | None) -> None:
            if entry.gen == self._gen:
                due = time.monotonic() + (delay or 0.0)
                self._redeliver.append((due, messages, entry))

        async def term(reason: str) -> None:
            self.context.logger.warning("%s: %d change(s) terminated, not redelivered: %s",
                                        self._name(), count, reason)
            self._settle(entry, count)

        return CallbackAck(ack=ack, nack=nack, term=term)

    def _settle(self, entry: _Entry, count: int) -> None:
        if entry.gen != self._gen:
            return  # read before a reconnect: the server sends these again
        entry.pending -= count
        if entry.snapshot:
            self._snap_unacked -= count
            self._check_snapshot_done()
        entries = self._entries
        target = 0
        while entries and entries[0].pending <= 0:
            target = max(target, entries.popleft().release)
        if target > self.confirmed:
            self._confirm(target)

    def _redelivery(self, max_messages: int) -> Batch | None:
        now = time.monotonic()
        for i, (due, messages, entry) in enumerate(self._redeliver):
            if due <= now:
                del self._redeliver[i]
                if len(messages) > max_messages:
                    rest = messages[max_messages:]
                    self._redeliver.appendleft((due, rest, entry))
                    messages = messages[:max_messages]
                return Batch(messages, self._ack_handle(entry, messages))
        return None

    # -- background: status updates, lag

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            conn = self._conn
            if conn is not None:
                conn.send_status(self.confirmed)
                with contextlib.suppress(OSError, ConnectionError):
                    await conn.drain()

    async def _lag_loop(self) -> None:
        cfg = self.config
        log = self.context.logger
        warned = 0.0
        while True:
            try:
                assert self._pool is not None
                row = await self._pool.fetchrow(
                    "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 AS lag "
                    "FROM pg_replication_slots WHERE slot_name = $1", self.slot)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.debug("%s: lag query failed: %s", self._name(), pg_error_text(exc))
            else:
                if row is None:
                    self._fatal = self._error("the replication slot was dropped while "
                                              "streaming")
                    log.error("%s", self._fatal)
                    return
                lag = max(0, int(row["lag"] or 0))
                self.retained_bytes = lag
                self.context.meters.lag_bytes(lag)  # natsconn_source_lag_bytes{pipeline}
                now = time.monotonic()
                if lag > cfg.lag_warning and now - warned > 300:
                    warned = now
                    log.warning("%s: the slot retains %d bytes of WAL (lag_warning %d): the "
                                "sink is behind or stalled, and the server keeps WAL for it",
                                self._name(), lag, cfg.lag_warning)
                else:
                    log.debug("%s: slot retains %d bytes of WAL", self._name(), lag)
            await asyncio.sleep(cfg.lag_interval)

    # -- close

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._end_snapshot_read()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.send_status(self.confirmed)
            await conn.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        self._reset_stream()


def _marked_slots(comment: str | None) -> list[str]:
    if not comment or not comment.startswith(_MARKER):
        return []
    return comment[len(_MARKER):].split()

