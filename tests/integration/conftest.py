"""Fixtures of the NATS integration tests.

``nats_url``, ``unique`` and ``tcp_proxy`` come from natsconn's pytest plugin
(``connector.testing.pytest_plugin``, loaded through the pytest11 entry point).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from connector.testing.servers import host_port

from .helpers import connect


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    """A raw nats-py connection for the test's own legs."""
    client = await connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
def nats_address(nats_url: str) -> tuple[str, int]:
    """(host, port) of the NATS server, for a TcpProxy in front of it."""
    return host_port("nats", nats_url)


@pytest.fixture
async def delete_streams(nats_url: str, unique: str) -> AsyncIterator[None]:
    """At teardown, delete the streams whose names carry this test's ``unique``
    suffix, so repeated runs do not fill the shared server's disk. (Not autouse:
    tests under this directory that need no NATS must not depend on it.)"""
    yield
    client = await connect(nats_url)
    try:
        js = client.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if unique in name:
                await js.delete_stream(name)
    finally:
        await client.close()
