"""The servers the fault matrix runs against, and how to reach them.

The matrix restarts servers and cuts connections. It uses the TLS/auth variants
of ``scripts/services start tls`` (JetStream with client certificates, Kafka
SASL_SSL, Redis TLS with an ACL user and AOF, PostgreSQL verify-full), never the
plain servers that other tests use at the same time; so the faults also run
over TLS and authentication, as a production deployment would.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import asyncpg
import nats
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from nats.aio.client import Client as NATS
from security.support import (
    KAFKA_PASSWORD,
    KAFKA_USER,
    PG_DB,
    PG_PASSWORD,
    PG_USER,
    REDIS_PASSWORD,
    REDIS_USER,
    Certs,
    tls_dir,
)

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
NATS_PORT, KAFKA_PORT, REDIS_PORT, PG_PORT = 4223, 9194, 6380, 5433
CERTS = Certs(tls_dir())


def ssl_context(client: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=CERTS.ca)
    if client:
        ctx.load_cert_chain(CERTS.client_cert, CERTS.client_key)
    return ctx


# ------------------------------------------------------------------ natsconn options


def nats_options(address: str = f"{HOST}:{NATS_PORT}") -> dict[str, Any]:
    return {"servers": [f"tls://{address}"], "tls": CERTS.mtls()}


def kafka_options(address: str = f"{HOST}:{KAFKA_PORT}") -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": [address], "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "username": KAFKA_USER, "password": KAFKA_PASSWORD,
        "tls": {"ca_file": CERTS.ca}, "connect_timeout": 20,
    }
    if address != f"{HOST}:{KAFKA_PORT}":  # through a proxy: the broker advertises itself
        options["broker_address_map"] = {f"{HOST}:{KAFKA_PORT}": address}
    return options


def redis_options(address: str = f"{HOST}:{REDIS_PORT}") -> dict[str, Any]:
    return {"url": f"rediss://{address}/0", "username": REDIS_USER, "password": REDIS_PASSWORD,
            "tls": CERTS.mtls(), "socket_timeout": 5}


def postgres_options(address: str = f"{HOST}:{PG_PORT}") -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"host": host, "port": int(port), "user": PG_USER, "password": PG_PASSWORD,
            "database": PG_DB, "ssl": {"mode": "verify-full", "ca_file": CERTS.ca},
            "connect_timeout": 5}


# ------------------------------------------------------------------ raw clients


async def nats_client() -> NATS:
    return await nats.connect(f"tls://{HOST}:{NATS_PORT}", tls=ssl_context(),
                              connect_timeout=5, max_reconnect_attempts=-1,
                              reconnect_time_wait=0.5, pending_size=64 * 1024 * 1024)


def redis_client() -> aioredis.Redis:
    return aioredis.Redis.from_url(
        f"rediss://{HOST}:{REDIS_PORT}/0", username=REDIS_USER, password=REDIS_PASSWORD,
        ssl_ca_certs=CERTS.ca, ssl_certfile=CERTS.client_cert, ssl_keyfile=CERTS.client_key)


async def pg_connect() -> asyncpg.Connection:
    return await asyncpg.connect(host=HOST, port=PG_PORT, user=PG_USER, password=PG_PASSWORD,
                                 database=PG_DB, ssl=ssl_context(client=False))


def _kafka_kwargs() -> dict[str, Any]:
    return {"bootstrap_servers": f"{HOST}:{KAFKA_PORT}", "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": KAFKA_USER,
            "sasl_plain_password": KAFKA_PASSWORD,
            "ssl_context": ssl_context(client=False)}


def kafka_admin() -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**_kafka_kwargs())


def kafka_producer() -> AIOKafkaProducer:
    return AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=5,
                            **_kafka_kwargs())


def kafka_consumer() -> AIOKafkaConsumer:
    return AIOKafkaConsumer(enable_auto_commit=False, **_kafka_kwargs())


# ------------------------------------------------------------------ restarts


async def restart(service: str) -> float:
    """``scripts/services restart SERVICE``; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    proc = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "services"), "restart", service,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/services restart {service} failed:\n{out.decode()}")
    return loop.time() - started


def check_running() -> None:
    """Fail with the command to run when a private server is not up."""
    import socket

    for name, port in (("nats-tls", NATS_PORT), ("kafka-tls", KAFKA_PORT),
                       ("redis-tls", REDIS_PORT), ("postgres-tls", PG_PORT)):
        try:
            with socket.create_connection((HOST, port), timeout=2):
                pass
        except OSError:
            raise RuntimeError(f"{name} is not running on {HOST}:{port}: start the matrix's "
                               f"servers with `scripts/services start tls`") from None
