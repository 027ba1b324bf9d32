"""Connection options: SSL is never weaker than asked, errors name the server but
never the password, DSN and fields combine."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import asyncpg
import pytest
from natsconn_postgres.connection import (
    PostgresConnectionConfig,
    connect_kwargs,
    ssl_context,
)
from natsconn_postgres.sink import PostgresSink

from connector import PluginContext, RetryableError

pytestmark = pytest.mark.integration


def _cfg(**options: object) -> PostgresConnectionConfig:
    return PostgresConnectionConfig.model_validate(options)


async def test_require_fails_against_a_server_without_ssl(
        postgres_dsn: str, db: asyncpg.Connection, tables: Callable[[str], str]) -> None:
    """The local server has ssl = off: asking for SSL must fail, not fall back."""
    assert await db.fetchval("SHOW ssl") == "off", "this test needs a server without SSL"
    table = tables("ssl")
    for mode in ("require", "verify-full"):
        sink = PostgresSink.make_test_instance(dsn=postgres_dsn, table=table,
                                               create_table=True, ssl={"mode": mode})
        with pytest.raises(RetryableError, match="SSL"):
            await sink.connect()
        await sink.close()
    dsn_require = postgres_dsn + ("&" if "?" in postgres_dsn else "?") + "sslmode=require"
    sink = PostgresSink.make_test_instance(dsn=dsn_require, table=table, create_table=True)
    with pytest.raises(RetryableError, match="SSL"):
        await sink.connect()
    assert not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table)


async def test_wrong_password_names_the_server_not_the_secret(postgres_dsn: str) -> None:
    sink = PostgresSink.make_test_instance(
        dsn=postgres_dsn, password="s3cret-Wrong-pw", table="t", create_table=True)
    with pytest.raises(RetryableError) as info:
        await sink.connect()
    text = str(info.value)
    assert "127.0.0.1:5432/natsconn" in text and "password authentication failed" in text
    assert "s3cret-Wrong-pw" not in text
    assert "s3cret-Wrong-pw" not in repr(sink.config)


async def test_fields_without_dsn(postgres_dsn: str, db: asyncpg.Connection,
                                  tables: Callable[[str], str]) -> None:
    """host/port/user/password/database instead of a DSN; statement_timeout and
    application_name reach the session."""
    table = tables("fields")
    sink = PostgresSink.make_test_instance(
        host="127.0.0.1", port=5432, user="natsconn", password="natsconn",
        database="natsconn", table=table, create_table=True, statement_timeout="7s",
        application_name=f"natsconn-test-{table}")
    await sink.connect()
    try:
        async with sink._pool.acquire() as conn:
            assert await conn.fetchval("SHOW statement_timeout") == "7s"
        names = await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE "
                                  "application_name = $1", f"natsconn-test-{table}")
        assert names >= 1
    finally:
        await sink.close()


def test_ssl_modes_build_the_checks_they_promise() -> None:
    assert ssl_context(_cfg()) is False
    require = ssl_context(_cfg(ssl={"mode": "require"}))
    assert isinstance(require, ssl.SSLContext)
    assert require.verify_mode == ssl.CERT_NONE and not require.check_hostname
    verify_ca = ssl_context(_cfg(ssl={"mode": "verify-ca"}))
    assert isinstance(verify_ca, ssl.SSLContext)
    assert verify_ca.verify_mode == ssl.CERT_REQUIRED and not verify_ca.check_hostname
    full = ssl_context(_cfg(ssl={"mode": "verify-full"}))
    assert isinstance(full, ssl.SSLContext)
    assert full.verify_mode == ssl.CERT_REQUIRED and full.check_hostname
    # The DSN's sslmode counts, and is taken out of the DSN asyncpg sees.
    from_dsn = _cfg(dsn="postgresql://u:p@h:5432/d?sslmode=verify-full&application_name=x")
    kwargs = connect_kwargs(from_dsn, PluginContext())
    assert isinstance(kwargs["ssl"], ssl.SSLContext) and kwargs["ssl"].check_hostname
    assert "sslmode" not in kwargs["dsn"] and "application_name=x" in kwargs["dsn"]


def test_fields_beside_a_dsn_override_only_their_part() -> None:
    ctx = PluginContext()
    dsn = "postgresql://u:p@db.example:5433/d"
    host_only = connect_kwargs(_cfg(dsn=dsn, host="localhost"), ctx)
    assert (host_only["host"], host_only["port"]) == ("localhost", 5433)
    port_only = connect_kwargs(_cfg(dsn=dsn, port=6000), ctx)
    assert (port_only["host"], port_only["port"]) == ("db.example", 6000)
    neither = connect_kwargs(_cfg(dsn=dsn, database="other"), ctx)
    assert "host" not in neither and "port" not in neither and neither["database"] == "other"


def test_ssl_modes_that_fall_back_silently_are_refused() -> None:
    for mode in ("prefer", "allow"):
        with pytest.raises(ValueError, match="fall back to plain text"):
            _cfg(dsn=f"postgresql://h/d?sslmode={mode}")
        with pytest.raises(ValueError):
            _cfg(ssl={"mode": mode})
    with pytest.raises(ValueError, match="contradicts"):
        _cfg(dsn="postgresql://h/d?sslmode=disable", ssl={"mode": "require"})
    with pytest.raises(ValueError, match="go together"):
        _cfg(ssl={"mode": "require", "cert_file": "/x.pem"})
