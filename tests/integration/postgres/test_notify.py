"""The ``postgres_notify`` source against the real server: LISTEN again after the
server ended the session, and overflow counted, never silent."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from natsconn_postgres.notify import NotifySource

from connector import NullMeters, PluginContext
from connector.testing.kit import collect

pytestmark = pytest.mark.integration


class CountingMeters(NullMeters):
    def __init__(self) -> None:
        self.dropped_count = 0
        self.lost = 0
        self.back = 0

    def dropped(self, count: int, reason: str) -> None:
        self.dropped_count += count

    def disconnected(self) -> None:
        self.lost += 1

    def reconnected(self) -> None:
        self.back += 1


async def test_listens_again_after_the_server_ends_the_session(
        postgres_dsn: str, db: asyncpg.Connection, unique: str) -> None:
    channel, app = f"chan_{unique}", f"natsconn-notify-{unique}"
    meters = CountingMeters()
    source = NotifySource.make_test_instance(
        PluginContext(meters=meters), dsn=postgres_dsn, channels=[channel, f"{channel}_b"],
        application_name=app, reconnect_wait="100ms", keepalive_interval="1s")
    await source.connect()
    try:
        await db.execute("SELECT pg_notify($1, 'one')", channel)
        got = await collect(source, 1, 5.0)
        assert [(m.subject, m.data) for m in got] == [(channel, b"one")]
        killed = await db.fetchval("SELECT count(pg_terminate_backend(pid)) FROM "
                                   "pg_stat_activity WHERE application_name = $1", app)
        assert killed == 1
        deadline = asyncio.get_running_loop().time() + 15
        seen: list[bytes] = []
        n = 0
        while asyncio.get_running_loop().time() < deadline and b"after" not in seen:
            n += 1  # lost while reconnecting: keep sending until one arrives
            await db.execute("SELECT pg_notify($1, 'after')", f"{channel}_b")
            seen += [m.data for m in await collect(source, 1, 0.5)]
        assert b"after" in seen, f"no notification after the session ended ({n} sent)"
        assert meters.lost >= 1 and meters.back >= 1
    finally:
        await source.close()


async def test_overflow_is_counted(postgres_dsn: str, db: asyncpg.Connection,
                                   unique: str) -> None:
    channel = f"chan_{unique}"
    meters = CountingMeters()
    source = NotifySource.make_test_instance(PluginContext(meters=meters), dsn=postgres_dsn,
                                             channels=[channel], max_buffered=5)
    await source.connect()
    try:
        async with db.transaction():
            for i in range(20):
                await db.execute("SELECT pg_notify($1, $2)", channel, str(i))
        got = []
        for _ in range(50):
            got += await collect(source, 5, 0.2)
            if len(got) + meters.dropped_count >= 20:
                break
        assert [m.data for m in got] == [str(i).encode() for i in range(5)]
        assert meters.dropped_count == 15
    finally:
        await source.close()


async def test_base64_payloads_and_bad_ones(postgres_dsn: str, db: asyncpg.Connection,
                                            unique: str) -> None:
    channel = f"chan_{unique}"
    meters = CountingMeters()
    source = NotifySource.make_test_instance(PluginContext(meters=meters), dsn=postgres_dsn,
                                             channels=[channel], payload_format="base64")
    await source.connect()
    try:
        await db.execute("SELECT pg_notify($1, 'AP8Abg=='), pg_notify($1, 'not base64!')",
                         channel)
        got = await collect(source, 2, 2.0)
        assert [m.data for m in got] == [b"\x00\xff\x00n"]
        assert meters.dropped_count == 1
    finally:
        await source.close()
