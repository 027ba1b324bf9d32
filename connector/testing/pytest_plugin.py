"""natsconn's pytest plugin, loaded through the ``pytest11`` entry point.

Fixtures for plugin tests against the real local servers:

* ``nats_url``, ``kafka_bootstrap``, ``redis_url``, ``postgres_dsn``: the
  address from the environment (``eval "$(scripts/services env)"``) or the
  ``scripts/services`` default. A server that does not answer FAILS the test
  with the command that starts it; it is never skipped.
* ``tcp_proxy``: a factory, ``proxy = await tcp_proxy("127.0.0.1", 4222)``,
  returning a started :class:`~connector.testing.proxy.TcpProxy`; every proxy
  made is closed at teardown.
* ``unique``: a short random suffix for stream, topic, key and table names, so
  that parallel runs and other tests do not collide.

Installed packages load this module in every pytest run, so it imports
little and needs nothing beyond pytest at import time.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from .proxy import TcpProxy
from .servers import ServiceUnavailable, check_reachable

try:  # works in both asyncio modes when pytest-asyncio is there
    import pytest_asyncio

    _async_fixture: Callable[..., Any] = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - only without pytest-asyncio
    _async_fixture = pytest.fixture

ProxyFactory = Callable[..., Awaitable[TcpProxy]]


def _require(name: str) -> str:
    try:
        return check_reachable(name)
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def nats_url() -> str:
    """``NATS_URL`` (default ``nats://127.0.0.1:4222``), checked reachable."""
    return _require("nats")


@pytest.fixture
def kafka_bootstrap() -> str:
    """``KAFKA_BOOTSTRAP`` (default ``127.0.0.1:9092``), checked reachable."""
    return _require("kafka")


@pytest.fixture
def redis_url() -> str:
    """``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), checked reachable."""
    return _require("redis")


@pytest.fixture
def postgres_dsn() -> str:
    """``POSTGRES_DSN`` (default the natsconn role and database), checked reachable."""
    return _require("postgres")


@pytest.fixture
def unique() -> str:
    """A short unique suffix, e.g. ``3f9a1c2b7d``: letters and digits only, so it
    fits NATS subjects, stream names, Kafka topics, Redis keys and SQL names."""
    return uuid.uuid4().hex[:10]


@_async_fixture
async def tcp_proxy() -> AsyncIterator[ProxyFactory]:
    """Factory of started TCP proxies to ``(host, port)``; all closed at teardown."""
    made: list[TcpProxy] = []

    async def make(host: str, port: int, *, delay: float = 0.0) -> TcpProxy:
        proxy = await TcpProxy(host, int(port), delay=delay).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop conformance tests that do not apply to a plugin's declared capabilities
    (an at-most-once source has no redelivery to test): they are not run, so they
    are neither passes nor skips; pytest reports them as deselected."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        applies = getattr(getattr(item, "cls", None), "applies", None)
        name = getattr(item, "originalname", None) or item.name
        if callable(applies) and not applies(name):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
