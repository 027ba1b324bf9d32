"""The ``postgres_cdc`` source against the conformance kit, on the real server
(``scripts/services start postgres``; wal_level = logical).

The kit compares payloads byte for byte, so the source runs with
``payload_column: data``: each inserted row's bytea ``data`` is the message.
Every test has its own table, publication and slot, dropped afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from natsconn_postgres.cdc import CdcSource

from connector import Message
from connector.testing.kit import SourceSuite
from connector.testing.servers import host_port

Produce = Callable[[list[Message]], Awaitable[None]]


async def drop_slot(conn: asyncpg.Connection, slot: str) -> None:
    """Drop a slot, waiting for a walsender that still holds it to go."""
    for _ in range(50):
        try:
            await conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                               "pg_replication_slots WHERE slot_name = $1", slot)
            return
        except asyncpg.ObjectInUseError:
            await conn.execute("SELECT pg_terminate_backend(active_pid) FROM "
                               "pg_replication_slots WHERE slot_name = $1", slot)
            await asyncio.sleep(0.1)


class TestCdcSource(SourceSuite):
    keeps_headers = False
    keeps_order = True
    redelivery_wait = 3.0

    @pytest.fixture
    def server_address(self, postgres_dsn: str) -> str:
        host, port = host_port("postgres", postgres_dsn)
        return f"{host}:{port}"

    @pytest.fixture
    async def db(self, postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(postgres_dsn)
        yield conn
        await conn.close()

    @pytest.fixture
    async def table(self, db: asyncpg.Connection, unique: str) -> AsyncIterator[str]:
        name = f"cdc_{unique}".lower()
        await db.execute(f'CREATE TABLE "{name}" (id bigserial PRIMARY KEY, data bytea)')
        yield name
        await drop_slot(db, name)
        await db.execute(f'DROP PUBLICATION IF EXISTS "{name}"')
        await db.execute(f'DROP TABLE IF EXISTS "{name}"')

    @pytest.fixture
    def make_source(self, postgres_dsn: str, table: str) -> Callable[[str | None], CdcSource]:
        def make(address: str | None = None) -> CdcSource:
            options: dict[str, Any] = {"dsn": postgres_dsn, "connect_timeout": "5s"}
            if address is not None:
                host, _, port = address.rpartition(":")
                options.update(host=host, port=int(port))
            return CdcSource.make_test_instance(
                slot=table, tables=[table], payload_column="data", **options)
        return make

    @pytest.fixture
    def produce(self, db: asyncpg.Connection, table: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            await db.executemany(f'INSERT INTO "{table}" (data) VALUES ($1)',
                                 [(m.data,) for m in messages])
        return produce
