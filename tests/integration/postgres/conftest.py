"""Fixtures of the PostgreSQL integration tests.

``postgres_dsn``, ``nats_url``, ``unique`` and ``tcp_proxy`` come from natsconn's
pytest plugin; ``nc`` (a raw NATS connection) from ``tests/integration``.
Every table a test makes is named with its ``unique`` suffix and dropped at
the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection for the test's own legs."""
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    if not conn.is_closed():
        await conn.close()


@pytest.fixture
async def tables(postgres_dsn: str, unique: str) -> AsyncIterator[Callable[[str], str]]:
    """``tables("events")`` → ``"events_<unique>"``; every name handed out is dropped
    at teardown (on a connection of its own: a test may restart the server)."""
    made: list[str] = []

    def name(stem: str) -> str:
        made.append(f"{stem}_{unique}")
        return made[-1]

    yield name
    if made:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            for table in made:
                await conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
        finally:
            await conn.close()
