"""The ``postgres`` sink: one transaction per batch, in one of three modes.

* ``copy``: ``COPY ... FROM STDIN (FORMAT binary)`` through asyncpg's record
  copy, the fast path. With an id column (``Message.id`` in a unique column)
  the batch is copied into a per-connection temporary table and moved with
  ``INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING``, so that a batch
  redelivered after a crash adds no duplicate.
* ``insert``: one ``INSERT ... SELECT FROM unnest($1::t1[], $2::t2[], ...)``
  per batch (arrays, one statement, not one per row); with an id column,
  ``ON CONFLICT (id) DO NOTHING`` as above.
* ``upsert``: the same statement with ``ON CONFLICT (keys) DO UPDATE`` (or
  ``DO NOTHING``); repeated keys within a batch are reduced to the latest row
  first, because one statement may not update a row twice.

A batch that fails because of some of its rows (SQLSTATE class 22 or 23) is
bisected in savepoints of one transaction: halves are written, the failing
halves split again until each bad row stands alone. The bad rows are rejected
with the database's error (they go to the dead-letter target) and the rest
commits, in about 2·k·log2(n) statements for k bad rows among n.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import asyncpg
from pydantic import Field, model_validator

from connector import ConnectorError, Message, PartialWriteError, RejectedError, Sink

from .catalog import columns as table_columns
from .catalog import table_exists, unique_keys
from .connection import (
    PostgresConnectionConfig,
    forget_connections,
    is_row_error,
    open_connection,
    open_pool,
    pg_error_text,
    quote_ident,
    quote_table,
    retryable,
    split_table,
)
from .mapping import ColumnSpec, RowBuilder, Source, default_type, normalize_columns


class Mode(StrEnum):
    copy = "copy"
    insert = "insert"
    upsert = "upsert"


class OnConflict(StrEnum):
    update = "update"
    nothing = "nothing"


class PostgresSinkConfig(PostgresConnectionConfig):
    table: str = Field(description="target table, 'name' or 'schema.name' (quoted as written)")
    mode: Mode = Field(Mode.copy, description="copy (fastest), insert, or upsert")
    columns: dict[str, str | ColumnSpec] | None = Field(
        None, description="column: source, or column: {from: source, type: sql_type}; "
        "sources: data, data.<path>, subject, key, headers, header.<Name>, id, timestamp. "
        "Default: id, subject, key, headers, data, timestamp from the parts of those names")
    key_columns: list[str] = Field(default_factory=list,
                                   description="upsert: the conflict key (a unique index)")
    on_conflict: OnConflict = Field(OnConflict.update, description="upsert: update the "
                                    "existing row, or keep it and skip the new one")
    update_columns: list[str] | None = Field(
        None, description="upsert: columns updated on conflict; default every non-key column")
    version_column: str | None = Field(
        None, description="upsert: update only when the new row's value here is >= the "
        "stored one (a redelivered older message does not overwrite newer values)")
    dedupe: bool = Field(True, description="copy/insert: when a column takes `id`, skip rows "
                         "whose id is already there (needs a unique index on it)")
    create_table: bool = Field(False, description="create the table from the mapping if it "
                               "does not exist")

    @model_validator(mode="after")
    def _check_mapping(self) -> PostgresSinkConfig:
        split_table(self.table)
        mapping = self.mapping()
        for name in [*self.key_columns, *(self.update_columns or []),
                     *([self.version_column] if self.version_column else [])]:
            if name not in mapping:
                raise ValueError(f"column {name!r} is not in `columns` ({', '.join(mapping)})")
        if self.mode is Mode.upsert and not self.key_columns:
            raise ValueError("mode upsert needs key_columns (the columns of a unique index)")
        if self.mode is not Mode.upsert and (self.key_columns or self.version_column
                                             or self.update_columns is not None):
            raise ValueError("key_columns, update_columns and version_column are for "
                             "mode: upsert")
        return self

    def mapping(self) -> dict[str, ColumnSpec]:
        return normalize_columns(self.columns)


class PostgresSink(Sink[PostgresSinkConfig]):
    """PostgreSQL table by COPY, insert or upsert; one transaction per batch.

    Rows the database refuses go to the dead letter alone; the rest commits."""

    Config = PostgresSinkConfig

    async def connect(self) -> None:
        cfg = self.config
        self._mapping = cfg.mapping()
        self._names = list(self._mapping)
        self._schema, self._table = split_table(cfg.table)
        self._qtable = quote_table(cfg.table)
        conn = await open_connection(cfg, self.context)
        try:
            await self._prepare(conn)
        except asyncpg.PostgresError as exc:
            raise ConnectorError(f"postgres sink, table {cfg.table}: {pg_error_text(exc)}"
                                 ) from None
        finally:
            await conn.close()
        self._pool = await open_pool(cfg, self.context,
                                     init=self._create_stage if self._stage else None)

    # ------------------------------------------------------------ preparing

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        cfg = self.config
        log = self.context.logger
        if not await table_exists(conn, cfg.table):
            if not cfg.create_table:
                raise ConnectorError(f"table {cfg.table} does not exist; create it, or set "
                                     "create_table: true")
            # UniqueViolation: another replica created it at the same moment.
            with contextlib.suppress(asyncpg.UniqueViolationError):
                await conn.execute(self._create_sql())
            log.info("created table %s", cfg.table)
        targets = await table_columns(conn, cfg.table)
        missing = [c for c in self._names if c not in targets]
        if missing:
            raise ConnectorError(f"table {cfg.table} has no column(s) {', '.join(missing)} "
                                 f"(it has {', '.join(targets)})")
        self._rows = RowBuilder(self._mapping, targets)
        keys = await unique_keys(conn, cfg.table)
        q = quote_ident
        conflict = ""
        self._key_positions: list[int] | None = None
        self._version_position: int | None = None
        self._id_column = self._column_of("id")
        if cfg.mode is Mode.upsert:
            if frozenset(cfg.key_columns) not in keys:
                raise ConnectorError(
                    f"upsert on {cfg.table} needs a unique index or primary key on exactly "
                    f"({', '.join(cfg.key_columns)}); create one, e.g. CREATE UNIQUE INDEX ON "
                    f"{self._qtable} ({', '.join(q(k) for k in cfg.key_columns)})")
            self._key_positions = [self._names.index(k) for k in cfg.key_columns]
            if cfg.version_column:
                self._version_position = self._names.index(cfg.version_column)
            conflict = f" ON CONFLICT ({', '.join(q(k) for k in cfg.key_columns)}) "
            update = cfg.update_columns if cfg.update_columns is not None else [
                c for c in self._names if c not in cfg.key_columns]
            if cfg.on_conflict is OnConflict.nothing or not update:
                conflict += "DO NOTHING"
            else:
                conflict += "DO UPDATE SET " + ", ".join(
                    f"{q(c)} = EXCLUDED.{q(c)}" for c in update)
                if cfg.version_column:
                    v = q(cfg.version_column)
                    conflict += f" WHERE t_.{v} IS NULL OR t_.{v} <= EXCLUDED.{v}"
        elif cfg.dedupe and self._id_column is not None:
            if frozenset([self._id_column]) not in keys:
                raise ConnectorError(
                    f"dedupe: column {self._id_column!r} of {cfg.table} takes the message id "
                    f"but has no unique index; create one (CREATE UNIQUE INDEX ON "
                    f"{self._qtable} ({q(self._id_column)})) or set dedupe: false "
                    "(then a redelivered batch may add duplicate rows)")
            conflict = f" ON CONFLICT ({q(self._id_column)}) DO NOTHING"
        else:
            log.info("postgres sink %s: no id column deduplicates rows; a batch redelivered "
                     "after a crash may be written twice", cfg.table)
        cols = ", ".join(q(c) for c in self._names)
        # unnest() flattens an array of arrays, so an array column travels as one
        # jsonb per row and is rebuilt per row (one dimension, as the mapping gives)
        self._json_positions = frozenset(
            i for i, c in enumerate(self._names) if targets[c].category == "A")
        arrays = ", ".join(
            f"${i + 1}::{'jsonb' if i in self._json_positions else targets[c].sql_type}[]"
            for i, c in enumerate(self._names))
        values = ", ".join(
            _array_from_json(f"u_.c{i}", targets[c].sql_type) if i in self._json_positions
            else f"u_.c{i}" for i, c in enumerate(self._names))
        aliases = ", ".join(f"c{i}" for i in range(len(self._names)))
        self._insert_sql = (f"INSERT INTO {self._qtable} AS t_ ({cols}) SELECT {values} FROM "
                            f"unnest({arrays}) AS u_({aliases}){conflict}")
        self._stage: str | None = None
        if cfg.mode is Mode.copy and conflict:
            digest = hashlib.sha1(cfg.table.encode()).hexdigest()[:12]
            self._stage = f"natsconn_stage_{digest}"
            self._stage_sql = (f"CREATE TEMP TABLE IF NOT EXISTS {q(self._stage)} ON COMMIT "
                               f"DELETE ROWS AS SELECT {cols} FROM {self._qtable} WITH NO DATA")
            self._from_stage_sql = (f"INSERT INTO {self._qtable} AS t_ ({cols}) SELECT {cols} "
                                    f"FROM {q(self._stage)}{conflict}")

    def _column_of(self, kind: str) -> str | None:
        for name, spec in self._mapping.items():
            if Source.parse(spec.source).kind == kind:
                return name
        return None

    def _create_sql(self) -> str:
        cfg = self.config
        q = quote_ident
        lines = [f"{q(name)} {default_type(spec)}" for name, spec in self._mapping.items()]
        id_column = self._column_of("id")
        if cfg.mode is Mode.upsert:
            lines.append(f"PRIMARY KEY ({', '.join(q(k) for k in cfg.key_columns)})")
        elif cfg.dedupe and id_column is not None:
            # UNIQUE, not PRIMARY KEY: sources without ids (core NATS, LISTEN) give NULL.
            lines.append(f"UNIQUE ({q(id_column)})")
        return f"CREATE TABLE IF NOT EXISTS {self._qtable} (\n  " + ",\n  ".join(lines) + "\n)"

    async def _create_stage(self, conn: asyncpg.Connection) -> None:
        await conn.execute(self._stage_sql)

    # -------------------------------------------------------------- writing

    async def write_batch(self, messages: Sequence[Message]) -> None:
        rows, positions, failed = self._rows.rows(messages)
        if self._key_positions is not None and rows:
            rows, positions = self._one_per_key(rows, positions)
        if rows:
            try:
                async with self._pool.acquire(timeout=self.config.connect_timeout) as conn:
                    try:
                        await self._write_all(conn, rows)
                    except Exception as exc:
                        if not is_row_error(exc):
                            raise
                        self.context.logger.info(
                            "a batch of %d row(s) failed on a row (%s); isolating the bad "
                            "row(s)", len(rows), pg_error_text(exc))
                        bad = await self._isolate(conn, rows)
                        for i, err in bad.items():
                            failed[positions[i]] = RejectedError(
                                f"postgres rejected the row: {pg_error_text(err)}")
            except ConnectorError:
                raise
            except Exception as exc:
                await forget_connections(self._pool, exc)
                raise retryable(exc, f"postgres write to {self.config.table}") from exc
        if failed:
            raise PartialWriteError(failed)

    def _one_per_key(self, rows: list[tuple[Any, ...]], positions: list[int]
                     ) -> tuple[list[tuple[Any, ...]], list[int]]:
        """One row per key, in key order.

        Which row a key keeps: for DO UPDATE with a ``version_column``, the row with
        the highest version (a redelivered old message can sit after a newer one in
        the same batch: keeping the later one would drop the newer values, as the
        statement's version guard then refuses the older); for DO UPDATE without
        one, the last row (latest values as delivered); for DO NOTHING, the first
        (as separate statements would do). The others count as written: their
        key's surviving row carries the outcome.

        Rows go out sorted by key, so that concurrent batches (``max_in_flight``
        > 1) lock the rows they share in the same order and do not deadlock."""
        assert self._key_positions is not None
        kp = self._key_positions
        keep: dict[tuple[Any, ...], int] = {}
        update = self.config.on_conflict is OnConflict.update
        vp = self._version_position
        for i, row in enumerate(rows):
            key = tuple(row[p] for p in kp)
            try:
                hash(key)
            except TypeError:  # an array column in the key
                key = (repr(key),)
            kept = keep.get(key)
            if kept is None or (update and (vp is None or not _older(row[vp], rows[kept][vp]))):
                keep[key] = i
        try:
            order = sorted(keep.items(), key=_key_order)
        except TypeError:  # values of one type that do not order: keep batch order
            order = sorted(keep.items(), key=lambda item: item[1])
        if len(order) == len(rows) and all(a[1] < b[1] for a, b in itertools.pairwise(order)):
            return rows, positions
        return [rows[i] for _, i in order], [positions[i] for _, i in order]

    async def _write_all(self, conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
        cfg = self.config
        async with conn.transaction():
            if cfg.mode is not Mode.copy:
                await conn.execute(self._insert_sql,
                                   *_arrays(rows, len(self._names), self._json_positions))
            elif self._stage is None:
                await conn.copy_records_to_table(self._table, schema_name=self._schema,
                                                 columns=self._names, records=rows)
            else:
                await conn.copy_records_to_table(self._stage, columns=self._names,
                                                 records=rows)
                await conn.execute(self._from_stage_sql)

    async def _isolate(self, conn: asyncpg.Connection, rows: list[tuple[Any, ...]]
                       ) -> dict[int, BaseException]:
        """Write ``rows`` in one transaction, bisecting in savepoints around the
        rows that fail; returns the failing rows' indices and errors."""
        bad: dict[int, BaseException] = {}
        ncols = len(self._names)
        statements = 0

        async def attempt(index: list[int], known_bad: bool) -> None:
            nonlocal statements
            if not known_bad:
                statements += 1
                try:
                    async with conn.transaction():  # a savepoint
                        await conn.execute(self._insert_sql, *_arrays(
                            [rows[i] for i in index], ncols, self._json_positions))
                    return
                except Exception as exc:
                    if not is_row_error(exc):
                        raise
                    if len(index) == 1:
                        bad[index[0]] = exc
                        return
            mid = len(index) // 2
            await attempt(index[:mid], False)
            await attempt(index[mid:], False)

        async with conn.transaction():
            await attempt(list(range(len(rows))), known_bad=len(rows) > 1)
        self.context.logger.warning(
            "postgres sink %s: isolated %d bad row(s) among %d in %d statement(s); the "
            "others are committed", self.config.table, len(bad), len(rows), statements)
        return bad

    async def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except Exception:
                pool.terminate()


def _older(version: Any, than: Any) -> bool:
    """Whether the version guard would let a row at ``than`` stand against one at
    ``version`` (NULL is older than any value, as the guard treats it)."""
    if version is None:
        return than is not None
    if than is None:
        return False
    try:
        return bool(version < than)
    except TypeError:
        return False


def _key_order(item: tuple[tuple[Any, ...], int]) -> tuple[Any, ...]:
    """Sort key for (key, row index) pairs: NULLs last, then by type name so that
    mixed types (a text key that is sometimes a number) still sort."""
    return tuple((v is None, type(v).__name__, v if v is not None else 0)
                 for v in item[0])


def _arrays(rows: list[tuple[Any, ...]], ncols: int,
            json_positions: frozenset[int] = frozenset()) -> list[list[Any]]:
    """Rows to one list per column, for ``unnest($1::t[], ...)``; the columns at
    ``json_positions`` (array columns) as JSON text, one document per row."""
    if not rows:
        return [[] for _ in range(ncols)]
    out = [list(col) for col in zip(*rows, strict=True)]
    for i in json_positions:
        out[i] = [None if v is None else json.dumps(v) for v in out[i]]
    return out


def _array_from_json(value: str, sql_type: str) -> str:
    """SQL turning a jsonb array (or NULL) into a value of the array type ``sql_type``;
    ``[]`` gives an empty array, a JSON value that is no array an error of the row."""
    return (f"(CASE WHEN {value} IS NULL THEN NULL ELSE COALESCE((SELECT array_agg(e_) "
            f"FROM jsonb_array_elements_text({value}) AS e_), '{{}}') END)::{sql_type}")
