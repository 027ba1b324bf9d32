"""Where the local test servers are, and whether they answer.

Addresses come from the environment variables that ``scripts/services env``
prints, with the same defaults. A server that does not accept a TCP
connection is a failure that says how to start it, never a silent skip: a
test that did not run proves nothing.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from connector import ConnectorError


@dataclass(frozen=True, slots=True)
class Service:
    """One local service: its environment variable, default and start command name."""

    name: str  # as `scripts/services start NAME` knows it
    env: str
    default: str
    default_port: int


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        Service("nats", "NATS_URL", "nats://127.0.0.1:4222", 4222),
        Service("kafka", "KAFKA_BOOTSTRAP", "127.0.0.1:9092", 9092),
        Service("redis", "REDIS_URL", "redis://127.0.0.1:6379/0", 6379),
        Service("postgres", "POSTGRES_DSN",
                "postgresql://natsconn:natsconn@127.0.0.1:5432/natsconn", 5432),
    )
}


class ServiceUnavailable(ConnectorError):
    """A local test server is not reachable."""


def configured(name: str) -> str:
    """The address of service ``name`` (``nats``, ``kafka``, ``redis``, ``postgres``)
    from its environment variable, or the default of ``scripts/services``."""
    service = SERVICES[name]
    return os.environ.get(service.env) or service.default


def host_port(name: str, value: str) -> tuple[str, int]:
    """The first ``(host, port)`` of a service address in any of the forms used:
    URLs (``nats://u:p@h:4222,nats://…``), ``h:p[,h:p]`` bootstrap lists, and
    libpq ``key=value`` strings (``host=… port=…``)."""
    service = SERVICES[name]
    first = value.split(",")[0].strip()
    if "=" in first and "://" not in first:  # libpq keyword/value form
        fields = dict(part.split("=", 1) for part in value.split() if "=" in part)
        return fields.get("host", "127.0.0.1"), int(fields.get("port", service.default_port))
    if "://" not in first:
        first = "tcp://" + first
    parts = urlsplit(first)
    return parts.hostname or "127.0.0.1", parts.port or service.default_port


def check_reachable(name: str, value: str | None = None, timeout: float = 2.0) -> str:
    """Return the service's configured address after a TCP connect to it succeeded.

    Raises :class:`ServiceUnavailable` naming the variable, the address and the
    command that starts the server.
    """
    service = SERVICES[name]
    value = value if value is not None else configured(name)
    host, port = host_port(name, value)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        source = f"{service.env}={value}" if os.environ.get(service.env) else (
            f"default {value}; set {service.env} to change it")
        raise ServiceUnavailable(
            f"{name} is not reachable at {host}:{port} ({source}): {exc.strerror or exc}. "
            f"Start it with `scripts/services start {name}`.") from None
    return value
