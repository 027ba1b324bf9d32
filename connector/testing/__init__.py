"""Test support for natsconn plugins: a conformance kit, fixtures and fault injection.

* :mod:`connector.testing.kit`: ``SourceSuite`` and ``SinkSuite``, pytest
  classes a plugin package subclasses to prove its plugin behaves (read its
  docstring first), and ``collect()``.
* :mod:`connector.testing.pytest_plugin`: fixtures ``nats_url``,
  ``kafka_bootstrap``, ``redis_url``, ``postgres_dsn``, ``tcp_proxy``,
  ``unique``; loaded automatically through the ``pytest11`` entry point.
* :mod:`connector.testing.proxy`: ``TcpProxy`` (cut, stall, delay a connection).
* :mod:`connector.testing.servers`: local server addresses and reachability.

Nothing here is imported by the engine; it needs pytest and pytest-asyncio
(the ``dev`` extra) only when the kit or the fixtures are used.
"""

from .proxy import TcpProxy
from .servers import ServiceUnavailable, check_reachable, configured

__all__ = ["ServiceUnavailable", "TcpProxy", "check_reachable", "configured"]
