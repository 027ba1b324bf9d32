"""Fixtures of the security tests: the certificates and the TLS/auth servers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from integration.helpers import connect
from nats.aio.client import Client as NATS

from .support import Certs, require, tls_dir


@pytest.fixture(scope="session")
def certs() -> Certs:
    return Certs(tls_dir())


@pytest.fixture
def nats_tls_url() -> str:
    """TLS with a required client certificate (tls://127.0.0.1:4223), JetStream on."""
    return require("nats_tls")


@pytest.fixture
def nats_auth_url() -> str:
    """Users: user/password and an NKey user; TLS offered, not required."""
    return require("nats_auth")


@pytest.fixture
def nats_token_url() -> str:
    return require("nats_token")


@pytest.fixture
def kafka_ssl_bootstrap() -> str:
    """SASL_SSL (SCRAM) listener of the second broker."""
    return require("kafka_ssl")


@pytest.fixture
def redis_tls_url() -> str:
    """TLS only, client certificate required, ACL users."""
    return require("redis_tls")


@pytest.fixture
def postgres_tls_dsn() -> str:
    """SSL only (hostssl), SCRAM passwords."""
    return require("postgres_tls")


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    """A raw connection to the shared plain NATS server."""
    client = await connect(nats_url)
    yield client
    await client.close()
