"""SSL against the second PostgreSQL cluster ``scripts/services start postgres-tls``
runs on 5433 (``ssl = on``, ``hostssl`` + SCRAM only), with the throwaway CA in
``$NATSCONN_TLS_DIR``. Each mode checks what it promises: ``verify-full`` the
chain and the host name, ``verify-ca`` the chain only, ``require`` encryption;
a certificate from another CA is refused, and nothing falls back to plain text."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from natsconn_postgres.sink import PostgresSink

from connector import Message, RetryableError

pytestmark = pytest.mark.integration

SERVICES = Path(__file__).resolve().parents[3] / "scripts" / "services"
DEFAULT_DSN = "postgresql://natsconn_tls:natsconn-tls-pw@127.0.0.1:5433/natsconn"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def tls_dsn() -> str:
    dsn = os.environ.get("POSTGRES_TLS_DSN", DEFAULT_DSN)
    parts = urlsplit(dsn)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5433
    if not _reachable(host, port):
        started = subprocess.run([str(SERVICES), "start", "postgres-tls"], capture_output=True,
                                 text=True, timeout=300, check=False)
        if started.returncode != 0 or not _reachable(host, port):
            pytest.fail(f"no SSL PostgreSQL at {host}:{port}, and `scripts/services start "
                        f"postgres-tls` did not bring one up:\n{started.stdout}"
                        f"{started.stderr}", pytrace=False)
    return dsn


@pytest.fixture
def tls_dir() -> Path:
    default = Path.home() / ".cache" / "natsconn" / "state" / "tls"
    return Path(os.environ.get("NATSCONN_TLS_DIR", default))


async def _ssl_in_use(dsn: str, table: str, **options: Any) -> bool:
    """Connect, write a row, and say whether the session is encrypted."""
    sink = PostgresSink.make_test_instance(dsn=dsn, table=table, create_table=True,
                                           **options)
    await sink.connect()
    try:
        await sink.write_batch([Message(b"x", "tls.test", None, {}, None, None)])
        async with sink._pool.acquire() as conn:
            encrypted = await conn.fetchval(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        return bool(encrypted)
    finally:
        await sink.close()


async def _refused(dsn: str, **options: Any) -> str:
    sink = PostgresSink.make_test_instance(dsn=dsn, table="never_created", **options)
    with pytest.raises(RetryableError) as info:
        await sink.connect()
    await sink.close()
    return str(info.value)


async def test_modes_that_connect(tls_dsn: str, tls_dir: Path, unique: str) -> None:
    ca = str(tls_dir / "ca.pem")
    table = f"tls_{unique}"
    assert await _ssl_in_use(tls_dsn, table, ssl={"mode": "verify-full", "ca_file": ca})
    assert await _ssl_in_use(tls_dsn, table, ssl={"mode": "verify-ca", "ca_file": ca})
    assert await _ssl_in_use(tls_dsn, table, ssl={"mode": "require"})
    # the certificate names 127.0.0.1, not localhost: verify-ca does not look at names
    assert await _ssl_in_use(tls_dsn, table, host="localhost",
                             ssl={"mode": "verify-ca", "ca_file": ca})
    # client certificate, and the DSN's own sslmode / sslrootcert
    assert await _ssl_in_use(tls_dsn, table, ssl={
        "mode": "verify-full", "ca_file": ca, "cert_file": str(tls_dir / "client.pem"),
        "key_file": str(tls_dir / "client.key")})
    assert await _ssl_in_use(f"{tls_dsn}?sslmode=verify-full&sslrootcert={ca}", table)


async def test_what_is_refused(tls_dsn: str, tls_dir: Path) -> None:
    ca, rogue = str(tls_dir / "ca.pem"), str(tls_dir / "rogue-ca.pem")
    mismatch = await _refused(tls_dsn, host="localhost",
                              ssl={"mode": "verify-full", "ca_file": ca})
    assert "localhost:5433" in mismatch and "mismatch" in mismatch.lower(), mismatch
    for mode in ("verify-full", "verify-ca", "require"):
        untrusted = await _refused(tls_dsn, ssl={"mode": mode, "ca_file": rogue})
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted, untrusted
    system_store = await _refused(tls_dsn, ssl={"mode": "verify-full"})
    assert "CERTIFICATE_VERIFY_FAILED" in system_store, system_store
    plain = await _refused(tls_dsn, ssl={"mode": "disable"})
    assert "no encryption" in plain, plain  # the server refuses plain TCP
    assert "natsconn-tls-pw" not in mismatch + untrusted + plain
