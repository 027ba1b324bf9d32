"""PostgreSQL: SCRAM passwords and SSL with verify-full, on the second cluster of
``scripts/services start postgres-tls`` (hostssl only). Bad passwords and
certificates are one clear error; /readyz stays 503; asking for SSL never ends
in plain text, and modes that could fall back silently are refused."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from integration.helpers import (
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    wait_until,
)
from nats.aio.client import Client as NATS
from natsconn_postgres.outbox import OutboxSource
from natsconn_postgres.sink import PostgresSink

from .support import (
    PG_DB,
    PG_PASSWORD,
    PG_USER,
    Certs,
    assert_pipelines_refused,
    connect_error,
    connects,
)

pytestmark = pytest.mark.integration

N = 300
PLAIN_DSN = "postgresql://natsconn:natsconn@127.0.0.1:5432/natsconn"  # ssl = off


def _dsn(password: str = PG_PASSWORD, host: str = "127.0.0.1", query: str = "") -> str:
    return (f"postgresql://{PG_USER}:{quote(password, safe='')}@{host}:5433/{PG_DB}"
            + (f"?{query}" if query else ""))


def _full(certs: Certs, **override: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"dsn": _dsn(), "connect_timeout": 5,
                               "ssl": {"mode": "verify-full", "ca_file": certs.ca}}
    options.update(override)
    return options


def _bad_cases(certs: Certs) -> dict[str, tuple[dict[str, Any], list[str]]]:
    return {
        "wrong password in the DSN": (_full(certs, dsn=_dsn("wrong-pg-pw-1")),
                                      ["password authentication failed", PG_USER]),
        "wrong password field": (
            {"host": "127.0.0.1", "port": 5433, "user": PG_USER, "password": "wrong-pg-pw-2",
             "database": PG_DB, "ssl": {"mode": "verify-full", "ca_file": certs.ca}},
            ["password authentication failed"]),
        "untrusted server certificate": (
            _full(certs, ssl={"mode": "verify-full", "ca_file": certs.rogue_ca}),
            ["SSL", "certificate verify failed"]),
        "system trust store only": (_full(certs, ssl={"mode": "verify-full"}),
                                    ["SSL", "certificate verify failed"]),
        "host name not in the certificate": (
            _full(certs, dsn=_dsn(host="localhost")), ["SSL", "Hostname mismatch"]),
        "untrusted CA with verify-ca": (
            _full(certs, ssl={"mode": "verify-ca", "ca_file": certs.rogue_ca}),
            ["certificate verify failed"]),
        "SSL against the server without SSL": (
            _full(certs, dsn=PLAIN_DSN), ["SSL", "rejected SSL upgrade"]),
        "require against the server without SSL": (
            {"dsn": PLAIN_DSN, "ssl": {"mode": "require"}}, ["rejected SSL upgrade"]),
        "no SSL against the SSL-only server": (
            {"dsn": _dsn()}, ["no pg_hba.conf entry", "no encryption"]),
    }


SECRETS = ["wrong-pg-pw-1", "wrong-pg-pw-2", PG_PASSWORD]


async def test_bad_credentials_and_certificates_are_one_clear_error(
        certs: Certs, postgres_tls_dsn: str, unique: str) -> None:
    for name, (options, words) in _bad_cases(certs).items():
        for plugin in (
            PostgresSink.make_test_instance(table=f"sec_{unique}", create_table=True,
                                            **options),
            OutboxSource.make_test_instance(table=f"secbox_{unique}", create_table=True,
                                            **options),
        ):
            text = await connect_error(plugin, *words, timeout=30)
            assert "cannot connect to PostgreSQL at" in text, (name, text)
            for secret in SECRETS:
                assert secret not in text, (name, text)


def test_modes_that_may_fall_back_to_plain_text_are_refused(certs: Certs) -> None:
    for mode in ("prefer", "allow"):
        with pytest.raises(ValueError, match="not supported"):
            PostgresSink.make_test_instance(table="t", dsn=_dsn(query=f"sslmode={mode}"))
    with pytest.raises(ValueError, match="contradicts"):
        PostgresSink.make_test_instance(table="t", dsn=_dsn(query="sslmode=disable"),
                                        ssl={"mode": "verify-full", "ca_file": certs.ca})


async def test_good_credentials_connect(certs: Certs, postgres_tls_dsn: str,
                                        unique: str) -> None:
    table = f"sec_{unique}"
    for options in (
        _full(certs),
        _full(certs, dsn=_dsn(query=f"sslmode=verify-full&sslrootcert={certs.ca}"), ssl={}),
        {"host": "127.0.0.1", "port": 5433, "user": PG_USER, "password": PG_PASSWORD,
         "database": PG_DB, "ssl": {"mode": "verify-full", "ca_file": certs.ca}},
        # verify-ca checks the chain, not the name: localhost is fine there
        _full(certs, dsn=_dsn(host="localhost"), ssl={"mode": "verify-ca",
                                                      "ca_file": certs.ca}),
    ):
        await connects(PostgresSink.make_test_instance(table=table, create_table=True,
                                                       **options))
    conn = await _admin(certs)
    try:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
    finally:
        await conn.close()


async def _admin(certs: Certs) -> asyncpg.Connection:
    ctx = ssl.create_default_context(cafile=certs.ca)
    return await asyncpg.connect(_dsn(), ssl=ctx)


async def test_round_trip_over_verify_full(
        nc: NATS, nats_url: str, certs: Certs, postgres_tls_dsn: str, unique: str,
        tmp_path: Path) -> None:
    """JetStream -> PostgreSQL (verify-full, SCRAM) and an outbox (verify-full) ->
    JetStream through natsconn run; the server sees SSL sessions; the password,
    read from a file, never shows in the log."""
    password_file = tmp_path / "pg-password"
    password_file.write_text(PG_PASSWORD + "\n")
    secure = {"host": "127.0.0.1", "port": 5433, "user": PG_USER, "database": PG_DB,
              "password": f"${{file:{password_file}}}",
              "ssl": {"mode": "verify-full", "ca_file": certs.ca}}
    table, outbox = f"sec_{unique}", f"secbox_{unique}"
    admin = await _admin(certs)
    await admin.execute(f'CREATE TABLE "{outbox}" (id bigserial PRIMARY KEY, data bytea, '
                        f'subject text, key bytea, headers jsonb, '
                        f'"timestamp" timestamptz DEFAULT now(), claimed_until timestamptz)')
    await admin.executemany(f'INSERT INTO "{outbox}" (data) VALUES ($1)',
                            [(b"row-%d" % i,) for i in range(N)])
    await create_stream(nc, f"SECP_IN_{unique}", [f"secpin.{unique}"])
    await create_stream(nc, f"SECP_OUT_{unique}", [f"secpout.{unique}"])
    await publish_js(nc, f"secpin.{unique}", N)
    file = pipeline_file(tmp_path, [
        {"name": f"to-pg-{unique}",
         "source": {"type": "jetstream", "servers": [nats_url], "stream": f"SECP_IN_{unique}"},
         "sink": {"type": "postgres", "table": table, "create_table": True, **secure}},
        {"name": f"outbox-{unique}",
         "source": {"type": "postgres_outbox", "table": outbox, "poll_interval": "200ms",
                    **secure},
         "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"secpout.{unique}"}},
    ], log={"level": "debug"}, shutdown_timeout="5s")
    try:
        async with natsconn_process(file) as proc:

            async def done() -> bool:
                try:
                    rows = await admin.fetchval(f'SELECT count(*) FROM "{table}"')
                except asyncpg.UndefinedTableError:
                    return False
                left = await admin.fetchval(f'SELECT count(*) FROM "{outbox}"')
                return bool(rows == N and left == 0)

            await wait_until(done, 60, f"{N} rows in {table} and {outbox} drained")
            sessions = await admin.fetch(
                "SELECT s.ssl, a.application_name FROM pg_stat_ssl s JOIN pg_stat_activity a "
                "USING (pid) WHERE a.application_name LIKE $1", f"natsconn:%{unique}%")
            log = proc.log()
        assert sessions and all(s["ssl"] for s in sessions), sessions
        info = await nc.jetstream().stream_info(f"SECP_OUT_{unique}")
        assert info.state.messages == N
        assert PG_PASSWORD not in log
    finally:
        for name in (table, outbox):
            await admin.execute(f'DROP TABLE IF EXISTS "{name}"')
        await admin.close()
        for stream in (f"SECP_IN_{unique}", f"SECP_OUT_{unique}"):
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(stream)


async def test_natsconn_run_names_the_pipeline_and_stays_not_ready(
        certs: Certs, postgres_tls_dsn: str, unique: str, tmp_path: Path) -> None:
    pipelines: list[dict[str, Any]] = []
    causes: dict[str, list[str]] = {}
    for i, (options, words) in enumerate(_bad_cases(certs).values()):
        name = f"bad{i:02d}-{unique}"
        pipelines.append({"name": name, "source": {"type": "generate", "rate": 1},
                          "sink": {"type": "postgres", "table": f"sec_{unique}",
                                   "create_table": True, **options}})
        causes[name] = [*words, "could not connect"]
    await assert_pipelines_refused(tmp_path, pipelines, causes, secrets=SECRETS)
