"""The three PostgreSQL plugins against the conformance kit, on the real server
(``scripts/services start postgres``).

Every test gets its own table (``conf_<unique>``) or channel, dropped afterwards.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from natsconn_postgres.notify import NotifySource
from natsconn_postgres.outbox import OutboxSource
from natsconn_postgres.sink import PostgresSink

from connector import Message
from connector.testing.kit import SinkSuite, SourceSuite
from connector.testing.servers import host_port

LEASE = 2.0  # the outbox's claim lease: unacknowledged rows come back after it
NOTIFY_MAX = 5000  # NOTIFY payloads are text below 8000 bytes; base64 adds a third

Produce = Callable[[list[Message]], Awaitable[None]]
Fetch = Callable[[int, float], Awaitable[list[Message]]]


@pytest.fixture
def server_address(postgres_dsn: str) -> str:
    host, port = host_port("postgres", postgres_dsn)
    return f"{host}:{port}"


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection straight to the server (never through the test proxy)."""
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


def _options(postgres_dsn: str, address: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"dsn": postgres_dsn, "connect_timeout": "5s"}
    if address is not None:
        host, _, port = address.rpartition(":")
        options.update(host=host, port=int(port))
    return options


@pytest.fixture
async def table(db: asyncpg.Connection, unique: str) -> AsyncIterator[str]:
    name = f"conf_{unique}"
    yield name
    await db.execute(f'DROP TABLE IF EXISTS "{name}"')


# ---------------------------------------------------------------------- sink


class TestPostgresSink(SinkSuite):
    keeps_key = True
    dedupes_by_id = True

    @pytest.fixture
    def make_sink(self, postgres_dsn: str, table: str) -> Callable[[str | None], PostgresSink]:
        def make(address: str | None = None) -> PostgresSink:
            return PostgresSink.make_test_instance(
                table=table, create_table=True, **_options(postgres_dsn, address))
        return make

    @pytest.fixture
    def fetch(self, db: asyncpg.Connection, table: str) -> Fetch:
        async def fetch(count: int, timeout: float) -> list[Message]:
            # The sink returns only after COMMIT: what is there is all there is.
            rows = await db.fetch(f'SELECT data, subject, key, headers, id FROM "{table}"')
            return [Message(r["data"], r["subject"], r["key"], json.loads(r["headers"]),
                            None, r["id"]) for r in rows]
        return fetch


class TestPostgresSinkInsertMode(TestPostgresSink):
    """The same suite through ``INSERT ... SELECT FROM unnest(...)``."""

    @pytest.fixture
    def make_sink(self, postgres_dsn: str, table: str) -> Callable[[str | None], PostgresSink]:
        def make(address: str | None = None) -> PostgresSink:
            return PostgresSink.make_test_instance(
                table=table, create_table=True, mode="insert",
                **_options(postgres_dsn, address))
        return make


# -------------------------------------------------------------------- outbox


class TestOutboxSource(SourceSuite):
    redelivery_wait = 5.0  # the lease is 2 s
    keeps_key = True
    keeps_order = True

    @pytest.fixture
    async def outbox(self, db: asyncpg.Connection, table: str) -> str:
        await db.execute(f"""
            CREATE TABLE "{table}" (
              id bigserial PRIMARY KEY, subject text, key bytea, headers jsonb,
              data bytea NOT NULL, claimed_until timestamptz)""")
        return table

    @pytest.fixture
    def make_source(self, postgres_dsn: str, outbox: str
                    ) -> Callable[[str | None], OutboxSource]:
        def make(address: str | None = None) -> OutboxSource:
            return OutboxSource.make_test_instance(
                table=outbox, lease=LEASE, poll_interval="200ms",
                **_options(postgres_dsn, address))
        return make

    @pytest.fixture
    def produce(self, db: asyncpg.Connection, outbox: str, unique: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            await db.executemany(
                f'INSERT INTO "{outbox}" (subject, key, headers, data) VALUES ($1, $2, $3, $4)',
                [(f"outbox.{unique}", m.key, json.dumps(dict(m.headers)), m.data)
                 for m in messages])
        return produce


class TestOutboxSourceMarkSent(TestOutboxSource):
    """The same suite with rows marked sent instead of deleted, woken by NOTIFY
    (the poll interval is long: only the notification makes it pass in time)."""

    @pytest.fixture
    async def outbox(self, db: asyncpg.Connection, table: str) -> str:
        await db.execute(f"""
            CREATE TABLE "{table}" (
              id bigserial PRIMARY KEY, subject text, key bytea, headers jsonb,
              data bytea NOT NULL, claimed_until timestamptz, sent_at timestamptz)""")
        return table

    @pytest.fixture
    def make_source(self, postgres_dsn: str, outbox: str
                    ) -> Callable[[str | None], OutboxSource]:
        def make(address: str | None = None) -> OutboxSource:
            return OutboxSource.make_test_instance(
                table=outbox, lease=LEASE, poll_interval="30s", on_sent="mark",
                notify_channel=f"{outbox}_wake", **_options(postgres_dsn, address))
        return make

    @pytest.fixture
    def produce(self, db: asyncpg.Connection, outbox: str, unique: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            async with db.transaction():
                await db.executemany(
                    f'INSERT INTO "{outbox}" (subject, key, headers, data) '
                    "VALUES ($1, $2, $3, $4)",
                    [(f"outbox.{unique}", m.key, json.dumps(dict(m.headers)), m.data)
                     for m in messages])
                await db.execute("SELECT pg_notify($1, '')", f"{outbox}_wake")
        return produce


# -------------------------------------------------------------------- notify


class TestNotifySource(SourceSuite):
    at_least_once = False
    keeps_headers = False
    gives_ids = False

    def _messages(self, n: int, tag: str | None = None, *, empty: bool = True
                  ) -> list[Message]:
        """The kit's payloads, the 16 KiB one cut to NOTIFY_MAX bytes: NOTIFY
        carries at most 7999 bytes of text (binary goes as base64 here)."""
        out = super()._messages(n, tag, empty=empty)
        return [Message(m.data[:NOTIFY_MAX], m.subject, m.key, m.headers) for m in out]

    @pytest.fixture
    def channel(self, unique: str) -> str:
        return f"conf_{unique}"

    @pytest.fixture
    def make_source(self, postgres_dsn: str, channel: str
                    ) -> Callable[[str | None], NotifySource]:
        def make(address: str | None = None) -> NotifySource:
            return NotifySource.make_test_instance(
                channels=[channel], payload_format="base64", keepalive_interval="1s",
                reconnect_wait="100ms", reconnect_wait_max="1s",
                **_options(postgres_dsn, address))
        return make

    @pytest.fixture
    def produce(self, db: asyncpg.Connection, channel: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            async with db.transaction():  # delivered together, at commit
                for m in messages:
                    await db.execute("SELECT pg_notify($1, $2)", channel,
                                     base64.b64encode(m.data).decode())
        return produce
