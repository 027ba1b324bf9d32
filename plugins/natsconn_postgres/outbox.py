"""The ``postgres_outbox`` source: a transactional outbox table, drained in id order.

Claims are leases, not open transactions. One short statement claims a batch:

    UPDATE outbox SET claimed_until = now() + lease
    FROM (SELECT id FROM outbox WHERE <unclaimed or lease expired> [AND sent_at IS NULL]
          ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED) c
    WHERE outbox.id = c.id RETURNING ...

``SKIP LOCKED`` lets replicas claim side by side without waiting on each
other, and the lease keeps a claimed row from every other replica until the
sink confirmed it: then it is deleted (or marked sent) in a second short
statement. No transaction stays open across the sink write, so a slow or
failing sink holds no locks and no snapshot (vacuum goes on), and any number
of batches may be in flight on a small pool. The engine renews the lease of
a batch still being written (``in_progress``), and so does the source itself,
every third of the lease, for every claim not yet settled (one statement for
all of them): a stalled sink must not let a lease run out under a batch still
queued or being written, whatever the pipeline's ``in_progress_interval``
(this instance's next claim would take the rows again). ``nack(delay)`` shortens the
lease to the delay. A crash leaves the lease to run out: those rows are sent
again then, the only case in which a row is sent twice. A row rejected with
no dead-letter target is parked with ``claimed_until = 'infinity'``.

Between empty claims the table is polled every ``poll_interval``; with
``notify_channel`` a NOTIFY on that channel (from the writers' transaction
or a trigger) wakes the source at once.

One claim runs ahead of the engine: when a claim came back full, the next one
starts at once, so that its statement (10-17 ms per 1,000 rows) overlaps the
engine's write of the batch just handed out instead of following it. Never
more than one is ahead. Rows claimed ahead are leased like any others and
released by ``close()`` like any unsettled claim (``close()`` lets a claim
still running finish first). Should the engine not ask for them within half
the lease, their lease is renewed before they are handed out, or, if little
of it is left, they are not handed out at all and come back when it runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import asyncpg
from pydantic import Field, model_validator

from connector import (
    Batch,
    CallbackAck,
    ConnectorError,
    Duration,
    Message,
    PluginConfig,
    Source,
)

from .catalog import columns as table_columns
from .catalog import table_exists
from .connection import (
    Backoff,
    PostgresConnectionConfig,
    forget_connections,
    open_connection,
    open_pool,
    pg_error_text,
    quote_ident,
    quote_table,
    retryable,
    split_table,
)
from .listener import Listener


class OnSent(StrEnum):
    delete = "delete"
    mark = "mark"


class OutboxColumns(PluginConfig):
    """Which column fills which part of the message. A column left at its default
    name is used when the table has it; one named here must exist."""

    data: str = Field("data", description="the payload: bytea, text, json or jsonb")
    subject: str | None = Field("subject", description="the subject (text)")
    key: str | None = Field("key", description="the key (bytea or text)")
    headers: str | None = Field("headers", description="headers: a json/jsonb object")
    timestamp: str | None = Field(None, description="a timestamptz column, e.g. created_at")


class OutboxSourceConfig(PostgresConnectionConfig):
    table: str = Field(description="the outbox table, 'name' or 'schema.name'")
    id_column: str = Field("id", description="unique, increasing row id (bigserial); rows "
                           "are claimed in its order")
    columns: OutboxColumns = Field(default_factory=OutboxColumns, description="message part: "
                                   "column; data, subject, key, headers, timestamp (null: "
                                   "not read)")
    lease_column: str = Field("claimed_until", description="timestamptz column holding "
                              "each claim's expiry (NULL: unclaimed)")
    lease: Duration = Field(60.0, gt=0, description="how long a claimed row is kept from "
                            "other replicas; renewed while its write is under way")
    on_sent: OnSent = Field(OnSent.delete, description="delete sent rows, or mark them "
                            "(sets sent_column)")
    sent_column: str = Field("sent_at", description="timestamptz column set on_sent: mark")
    poll_interval: Duration = Field(1.0, gt=0, description="wait between claims that found "
                                    "nothing")
    notify_channel: str | None = Field(None, description="LISTEN here to claim at once when "
                                       "writers NOTIFY")
    keepalive_interval: Duration = Field(10.0, gt=0, description="check of the LISTEN "
                                         "connection")
    create_table: bool = Field(False, description="create the table (and, with "
                               "notify_channel, a NOTIFY trigger) if it does not exist")

    @model_validator(mode="after")
    def _names(self) -> OutboxSourceConfig:
        split_table(self.table)
        return self


Row = Any  # an asyncpg.Record: indexable by position


_Claimed = tuple[list[Row], "_Claim | None"]


class _Claim:
    """The row ids of one batch and when their lease runs out (monotonic; measured
    from before the claim statement, so never later than the server's expiry)."""

    __slots__ = ("deadline", "ids")

    def __init__(self, ids: list[Any], deadline: float) -> None:
        self.ids = ids
        self.deadline = deadline


class OutboxSource(Source[OutboxSourceConfig]):
    """PostgreSQL outbox table: leased claims with SKIP LOCKED, removed once written.

    Rows are deleted (or marked sent) only after the sink confirmed them."""

    Config = OutboxSourceConfig

    @classmethod
    def shareable(cls, config: PluginConfig) -> bool:
        """Replicas claim disjoint rows with FOR UPDATE SKIP LOCKED."""
        return True

    async def connect(self) -> None:
        cfg = self.config
        self._wake = asyncio.Event()
        self._last_claim = 0.0
        self._drained = False  # the last claim came back short: wait before the next
        self._claims: set[_Claim] = set()  # claimed, not yet settled
        self._ahead: asyncio.Task[_Claimed] | None = None  # the claim running ahead
        self._spare: tuple[list[Row], _Claim] | None = None  # claimed ahead, not asked for
        conn = await open_connection(cfg, self.context)
        try:
            await self._prepare(conn)
        except asyncpg.PostgresError as exc:
            raise ConnectorError(f"postgres outbox {cfg.table}: {pg_error_text(exc)}"
                                 ) from None
        finally:
            await conn.close()
        self._pool = await open_pool(cfg, self.context)
        self._listener: Listener | None = None
        if cfg.notify_channel:
            self._listener = Listener(cfg, self.context, [cfg.notify_channel],
                                      lambda channel, payload: self._wake.set(),
                                      keepalive=cfg.keepalive_interval,
                                      on_reconnect=self._wake.set)
            try:
                await self._listener.start()
            except BaseException:
                await self._pool.close()
                raise
        self._keeper = asyncio.create_task(self._keep_leases(),
                                           name="postgres-outbox-keep-leases")

    async def _keep_leases(self) -> None:
        """Every third of the lease: renew the claims that have used a third of it."""
        lease = self.config.lease
        every = max(lease / 3, 0.05)
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            due = [c for c in self._claims if c.deadline - now < lease * 2 / 3]
            if not due:
                continue
            try:
                async with self._pool.acquire(timeout=self.config.connect_timeout) as conn:
                    await conn.execute(self._lease_sql, [i for c in due for i in c.ids], lease)
            except Exception as exc:  # the next round tries again
                await forget_connections(self._pool, exc)
                self.context.logger.debug("postgres outbox %s: renewing leases: %s",
                                          self.config.table, pg_error_text(exc))
                continue
            for claim in due:
                claim.deadline = now + lease

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        cfg = self.config
        if not await table_exists(conn, cfg.table):
            if not cfg.create_table:
                raise ConnectorError(f"outbox table {cfg.table} does not exist; create it, "
                                     "or set create_table: true")
            async with conn.transaction():
                for sql in self._create_sql():
                    await conn.execute(sql)
            self.context.logger.info("created outbox table %s", cfg.table)
        have = await table_columns(conn, cfg.table)
        q = quote_ident
        needed = [cfg.id_column, cfg.lease_column]
        if cfg.on_sent is OnSent.mark:
            needed.append(cfg.sent_column)
        parts: list[tuple[str, str]] = []  # (part, column)
        explicit = cfg.columns.model_fields_set
        for part in ("data", "subject", "key", "headers", "timestamp"):
            column = getattr(cfg.columns, part)
            if column is None:
                continue
            if column not in have and part not in explicit and part != "data":
                continue  # a default name the table does not use
            needed.append(column)
            parts.append((part, column))
        missing = [c for c in needed if c not in have]
        if missing:
            raise ConnectorError(
                f"outbox table {cfg.table} has no column(s) {', '.join(missing)} (it has "
                f"{', '.join(have)}); name the right ones in the options, or set an unused "
                "part to null under columns:")
        if have[cfg.lease_column].base_type != "timestamptz":
            raise ConnectorError(f"outbox column {cfg.lease_column} must be timestamptz, "
                                 f"found {have[cfg.lease_column].sql_type}")
        table, idc, lease = quote_table(cfg.table), q(cfg.id_column), q(cfg.lease_column)
        eligible = f"({lease} IS NULL OR {lease} < now())"
        if cfg.on_sent is OnSent.mark:
            eligible += f" AND {q(cfg.sent_column)} IS NULL"
        returning = ", ".join([f"o.{idc}", *(f"o.{q(c)}" for _, c in parts)])
        self._claim_sql = (
            f"UPDATE {table} AS o SET {lease} = now() + $2 * interval '1 second' "
            f"FROM (SELECT {idc} FROM {table} WHERE {eligible} ORDER BY {idc} LIMIT $1 "
            f"FOR UPDATE SKIP LOCKED) AS c WHERE o.{idc} = c.{idc} RETURNING {returning}")
        ids = f"ANY($1::{have[cfg.id_column].sql_type}[])"
        if cfg.on_sent is OnSent.delete:
            self._done_sql = f"DELETE FROM {table} WHERE {idc} = {ids}"
        else:
            self._done_sql = (f"UPDATE {table} SET {q(cfg.sent_column)} = now(), {lease} = "
                              f"NULL WHERE {idc} = {ids}")
        self._lease_sql = (f"UPDATE {table} SET {lease} = now() + $2 * interval '1 second' "
                           f"WHERE {idc} = {ids}")
        self._park_sql = f"UPDATE {table} SET {lease} = 'infinity' WHERE {idc} = {ids}"
        self._release_sql = f"UPDATE {table} SET {lease} = NULL WHERE {idc} = {ids}"
        self._to_message = _converter(cfg.table, [p for p, _ in parts])

    def _create_sql(self) -> list[str]:
        cfg = self.config
        q = quote_ident
        cols = cfg.columns
        lines = [f"{q(cfg.id_column)} bigserial PRIMARY KEY"]
        kinds = {"subject": "text", "key": "bytea", "headers": "jsonb"}
        for part, sql_type in kinds.items():
            name = getattr(cols, part)
            if name is not None:
                lines.append(f"{q(name)} {sql_type}")
        lines.append(f"{q(cols.data)} bytea NOT NULL")
        if cols.timestamp is not None:
            lines.append(f"{q(cols.timestamp)} timestamptz NOT NULL DEFAULT now()")
        lines.append(f"{q(cfg.lease_column)} timestamptz")
        if cfg.on_sent is OnSent.mark:
            lines.append(f"{q(cfg.sent_column)} timestamptz")
        table = quote_table(cfg.table)
        out = [f"CREATE TABLE {table} (\n  " + ",\n  ".join(lines) + "\n)"]
        if cfg.on_sent is OnSent.mark:
            out.append(f"CREATE INDEX ON {table} ({q(cfg.id_column)}) "
                       f"WHERE {q(cfg.sent_column)} IS NULL")
        if cfg.notify_channel:
            digest = hashlib.sha1(cfg.table.encode()).hexdigest()[:12]
            function = q(f"natsconn_outbox_notify_{digest}")
            channel = cfg.notify_channel.replace("'", "''")
            out.append(f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger "
                       f"LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('{channel}', ''); "
                       "RETURN NULL; END $$")
            out.append(f"CREATE TRIGGER {q('natsconn_notify')} AFTER INSERT ON {table} "
                       f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()")
        return out

    # -------------------------------------------------------------- reading

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        rows, claim = await self._next(max_messages, max_wait)
        if claim is None:
            return None
        if len(rows) > max_messages:  # claimed ahead for a larger batch than this one
            rest = rows[max_messages:]
            rows = rows[:max_messages]
            claim.ids = claim.ids[:max_messages]
            spare = _Claim([r[0] for r in rest], claim.deadline)
            self._claims.add(spare)
            self._spare = (rest, spare)
        if not self._drained and self._spare is None and self._ahead is None:
            self._ahead = asyncio.create_task(self._claim(max_messages),
                                              name="postgres-outbox-claim-ahead")
        return Batch([self._to_message(r) for r in rows], CallbackAck(
            ack=lambda: self._settle(claim, self._done_sql),
            nack=lambda delay: self._nack(claim, delay),
            term=lambda reason: self._park(claim, reason),
            in_progress=lambda: self._extend(claim),
        ))

    async def _next(self, max_messages: int, max_wait: float) -> _Claimed:
        """The rows to hand out now: spare rows, else the claim running ahead, else a
        claim made now (after the poll wait when the table was drained)."""
        if self._spare is not None:
            rows, spare = self._spare
            self._spare = None
            if await self._still_ours(spare):
                return rows, spare
        ahead = self._ahead
        if ahead is not None:
            try:
                # shielded: should this read be cancelled, the claim goes on and
                # stays known (the next read, or close(), takes its rows)
                rows, claim = await asyncio.shield(ahead)
            finally:
                if ahead.done():
                    self._ahead = None
            if claim is None or await self._still_ours(claim):
                return rows, claim
            self._drained = False  # the rows were given up: claim again now
        cfg = self.config
        if self._drained and not self._wake.is_set():
            due = self._last_claim + cfg.poll_interval - time.monotonic()
            if due > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), min(due, max_wait))
                except TimeoutError:
                    if due > max_wait:
                        return [], None
        return await self._claim(max_messages)

    async def _claim(self, n: int) -> _Claimed:
        """One claim statement: up to ``n`` rows leased to this instance, id order."""
        cfg = self.config
        self._wake.clear()
        started = time.monotonic()
        try:
            async with self._pool.acquire(timeout=cfg.connect_timeout) as conn:
                rows = await conn.fetch(self._claim_sql, n, cfg.lease)
        except Exception as exc:
            await forget_connections(self._pool, exc)
            raise retryable(exc, f"postgres outbox {cfg.table}: claim") from exc
        self._last_claim = time.monotonic()
        self._drained = len(rows) < n
        if not rows:
            return [], None
        rows.sort(key=lambda r: r[0])
        claim = _Claim([r[0] for r in rows], started + cfg.lease)
        self._claims.add(claim)  # from here on close() releases them
        return rows, claim

    async def _still_ours(self, claim: _Claim) -> bool:
        """May rows claimed ahead still be handed out? Yes with half their lease
        left; with less, after renewing it; not when so little is left that the
        renewal could land after another replica took them over (they are then
        dropped here and come back when the lease runs out)."""
        lease = self.config.lease
        left = claim.deadline - time.monotonic()
        if left >= lease / 2:
            return True
        if left > lease / 10:
            try:
                await self._extend(claim)
                return True
            except Exception as exc:
                await forget_connections(self._pool, exc)
                self.context.logger.warning("postgres outbox %s: renewing %d row(s) claimed "
                                            "ahead failed: %s", self.config.table,
                                            len(claim.ids), pg_error_text(exc))
        self._claims.discard(claim)
        self.context.logger.info("postgres outbox %s: %d row(s) claimed ahead were not asked "
                                 "for in time; they come back when their lease runs out",
                                 self.config.table, len(claim.ids))
        return False

    async def _nack(self, claim: _Claim, delay: float | None) -> None:
        wait = max(0.0, delay or 0.0)
        await self._settle(claim, self._lease_sql, wait)
        if wait == 0:
            self._wake.set()  # claim them again at once rather than after poll_interval

    async def _settle(self, claim: _Claim, sql: str, *extra: Any) -> None:
        """Run an ack statement; on failure retry until the claim's lease would have
        run out (after that another replica may have the rows: stop trying)."""
        self._claims.discard(claim)
        ids, deadline = claim.ids, claim.deadline
        cfg = self.config
        backoff = Backoff(cfg.reconnect_wait, cfg.reconnect_wait_max)
        while True:
            try:
                async with self._pool.acquire(timeout=cfg.connect_timeout) as conn:
                    await conn.execute(sql, ids, *extra)
                return
            except Exception as exc:
                await forget_connections(self._pool, exc)
                wait = backoff.next()
                if time.monotonic() + wait > deadline:
                    raise retryable(exc, f"postgres outbox {cfg.table}: settling "
                                    f"{len(ids)} row(s)") from exc
                self.context.logger.warning("postgres outbox %s: settling %d row(s) failed, "
                                            "retrying in %.1fs: %s", cfg.table, len(ids),
                                            wait, pg_error_text(exc))
                await asyncio.sleep(wait)

    async def _park(self, claim: _Claim, reason: str) -> None:
        self.context.logger.error("postgres outbox %s: parking %d row(s) (%s = 'infinity'), "
                                  "never to be sent: %s", self.config.table, len(claim.ids),
                                  self.config.lease_column, reason)
        await self._settle(claim, self._park_sql)

    async def _extend(self, claim: _Claim) -> None:
        lease = self.config.lease
        async with self._pool.acquire(timeout=self.config.connect_timeout) as conn:
            await conn.execute(self._lease_sql, claim.ids, lease)
        claim.deadline = time.monotonic() + lease

    async def close(self) -> None:
        keeper = getattr(self, "_keeper", None)
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        listener = getattr(self, "_listener", None)
        if listener is not None:
            await listener.close()
        pool = getattr(self, "_pool", None)
        if pool is None:
            return
        await self._finish_ahead()
        self._spare = None  # its claim is in _claims: released below
        claims, self._claims = self._claims, set()
        ids = [i for claim in claims for i in claim.ids]
        if ids:  # hand unsettled rows back now rather than when their lease runs out
            try:
                async with pool.acquire(timeout=self.config.connect_timeout) as conn:
                    await conn.execute(self._release_sql, ids)
            except Exception as exc:
                self.context.logger.warning(
                    "postgres outbox %s: could not release %d claimed row(s) at close; "
                    "they are sent again when their lease runs out: %s", self.config.table,
                    len(ids), pg_error_text(exc))
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except Exception:
                pool.terminate()

    async def _finish_ahead(self) -> None:
        """Let a claim still running ahead end, so that its rows are known and can be
        released. Cancelled after ``connect_timeout``: rows it had leased then come
        back when the lease runs out (never lost, never sent twice)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        done, _ = await asyncio.wait({ahead}, timeout=self.config.connect_timeout)
        if not done:
            ahead.cancel()
            self.context.logger.warning("postgres outbox %s: a claim still running at close "
                                        "was cancelled; rows it leased come back when the "
                                        "lease runs out", self.config.table)
            await asyncio.wait({ahead})  # its end, without taking close()'s own cancel
        if not ahead.cancelled() and ahead.exception() is not None:
            # it leased nothing we know of
            self.context.logger.debug("postgres outbox: claim ahead ended with %r",
                                      ahead.exception())


def _converter(table: str, parts: list[str]) -> Callable[[Row], Message]:
    """Record (id, then the mapped parts in order) → Message with id '<table>:<id>'."""
    index = {part: i + 1 for i, part in enumerate(parts)}
    di = index["data"]
    si, ki, hi, ti = (index.get(p) for p in ("subject", "key", "headers", "timestamp"))

    def convert(r: Row) -> Message:
        data = _as_bytes(r[di]) or b""
        subject = None if si is None or r[si] is None else str(r[si])
        key = None if ki is None else _as_bytes(r[ki])
        headers = {} if hi is None else _as_headers(r[hi])
        ts = None if ti is None else _as_epoch(r[ti])
        return Message(data, subject, key, headers, ts, f"{table}:{r[0]}")

    return convert


def _as_bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return json.dumps(value).encode() if isinstance(value, dict | list) else str(value).encode()


def _as_headers(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def _as_epoch(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None

