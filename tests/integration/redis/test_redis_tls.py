"""TLS to Redis: server verified against a CA, client certificate (mutual TLS),
both with host/port options and with a ``rediss://`` URL; a server whose
certificate the CA did not sign is refused.

``scripts/services`` runs Redis without TLS, so this module starts its own
``redis-server`` (the same Debian binary) with a TLS port only, and throwaway
certificates made with ``openssl``; both are stopped and removed afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from natsconn_redis.stream_sink import RedisStreamSink
from natsconn_redis.stream_source import RedisStreamSource

from connector import ConnectorError, Message
from connector.testing.kit import collect

from ..helpers import free_port, wait_until

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class TlsServer:
    port: int
    ca: str
    cert: str  # client certificate
    key: str
    other_ca: str  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(d: Path) -> None:
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.crt", "-days", "1", "-subj", f"/CN=natsconn {ca}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN=natsconn {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile",
                 "san.ext", cwd=d)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
async def tls_redis(tmp_path: Path) -> AsyncIterator[TlsServer]:
    d = tmp_path / "tls"
    d.mkdir()
    await asyncio.to_thread(_make_certs, d)
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port),
        "--bind", "127.0.0.1", "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
        "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes", "--save", "",
        "--appendonly", "no", "--dir", str(d), cwd=d,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_until(lambda: _accepts(port), 10, f"redis-server with TLS on {port}")
        yield TlsServer(port, str(d / "ca.crt"), str(d / "client.crt"),
                        str(d / "client.key"), str(d / "other-ca.crt"))
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)


@pytest.mark.parametrize("how", ["host", "url"])
async def test_mutual_tls_round_trip(tls_redis: TlsServer, how: str) -> None:
    tls = {"ca_file": tls_redis.ca, "cert_file": tls_redis.cert, "key_file": tls_redis.key}
    where = ({"host": "127.0.0.1", "port": tls_redis.port} if how == "host"
             else {"url": f"rediss://127.0.0.1:{tls_redis.port}/0"})
    sink = RedisStreamSink.make_test_instance(**where, tls=tls, stream="tls")
    source = RedisStreamSource.make_test_instance(**where, tls=tls, streams=["tls"],
                                                  group=f"g-{how}")
    await sink.connect()
    await source.connect()
    try:
        sent = [Message(b"secret %d" % i, "t.x", None, {"H": str(i)}) for i in range(100)]
        await sink.write_batch(sent)
        got = await collect(source, 100, 10)
    finally:
        await sink.close()
        await source.close()
    assert [m.data for m in got] == [m.data for m in sent]
    assert [m.headers["H"] for m in got] == [str(i) for i in range(100)]


async def test_server_signed_by_another_ca_is_refused(tls_redis: TlsServer) -> None:
    sink = RedisStreamSink.make_test_instance(
        host="127.0.0.1", port=tls_redis.port, stream="tls", reconnect={"attempts": 0},
        tls={"ca_file": tls_redis.other_ca, "cert_file": tls_redis.cert,
             "key_file": tls_redis.key})
    with pytest.raises(ConnectorError, match="certificate verify failed"):
        await sink.connect()
    await sink.close()


async def test_client_without_certificate_is_refused(tls_redis: TlsServer) -> None:
    sink = RedisStreamSink.make_test_instance(
        host="127.0.0.1", port=tls_redis.port, stream="tls", reconnect={"attempts": 0},
        tls={"ca_file": tls_redis.ca})
    with pytest.raises(ConnectorError, match=f"cannot connect to redis at 127.0.0.1:"
                                             f"{tls_redis.port}/0"):
        await sink.connect()
    await sink.close()
