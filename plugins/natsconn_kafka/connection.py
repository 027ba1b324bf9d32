"""Connection options shared by the Kafka source and sink, and the start call.

aiokafka reports why a bootstrap failed only in its own log lines and raises a
generic "Unable to bootstrap"; :func:`start_client` captures those lines while
a client starts, so that the one error natsconn raises names the cause (refused
connection, unknown host, SASL authentication failed) and aiokafka's
duplicates of it are not logged. Later, repeats of aiokafka's warnings are
rate-limited (see :class:`_AiokafkaLogs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from connector import ConnectorError, Duration, PluginConfig, PluginContext, RetryableError


class SecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class KafkaTlsConfig(PluginConfig):
    ca_file: str | None = Field(None, description="CA bundle to verify the brokers with; "
                                "default: the system's trust store")
    cert_file: str | None = Field(None, description="client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="client private key (mutual TLS)")
    key_password: SecretStr | None = Field(None, description="password of key_file")
    check_hostname: bool = Field(True, description="verify that the broker's certificate "
                                 "names the host connected to")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"expected a readable file, found no file at {value!r}")
        return value

    @model_validator(mode="after")
    def _pair(self) -> KafkaTlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls: cert_file and key_file go together")
        return self


class KafkaConnectionConfig(PluginConfig):
    bootstrap_servers: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:9092"], min_length=1,
        description="host:port of one or more brokers (a comma-separated string works too)")
    client_id: str | None = Field(None, description="client id shown in broker logs and "
                                  "quotas; default natsconn-<pipeline>-<role>")
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: SaslMechanism = Field(SaslMechanism.PLAIN, description="with "
                                          "SASL_PLAINTEXT or SASL_SSL")
    username: str | None = Field(None, description="SASL user")
    password: SecretStr | None = Field(None, description="SASL password")
    tls: KafkaTlsConfig | None = Field(None, description="with SSL or SASL_SSL")
    broker_address_map: dict[str, str] = Field(
        default_factory=dict, description="advertised host:port -> host:port to connect to "
        "instead (port-forwards, tunnels, test proxies)")
    connect_timeout: Duration = Field(15.0, gt=0, description="longest wait for the first "
                                      "connection (and, for the source, the group join)")
    request_timeout: Duration = Field(30.0, gt=0, description="longest wait for one broker "
                                      "request")

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for server in value:
            _split(server)
        return value

    @field_validator("broker_address_map")
    @classmethod
    def _map(cls, value: dict[str, str]) -> dict[str, str]:
        for advertised, actual in value.items():
            _split(advertised)
            _split(actual)
        return value

    @model_validator(mode="after")
    def _security(self) -> KafkaConnectionConfig:
        sasl = self.security_protocol in (SecurityProtocol.SASL_PLAINTEXT,
                                          SecurityProtocol.SASL_SSL)
        tls = self.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)
        if sasl and (not self.username or self.password is None):
            raise ValueError(f"security_protocol {self.security_protocol.value} needs "
                             "username and password")
        if not sasl and (self.username or self.password is not None):
            raise ValueError("username/password are given but security_protocol is "
                             f"{self.security_protocol.value}; use SASL_PLAINTEXT or SASL_SSL")
        if self.tls is not None and not tls:
            raise ValueError("tls is given but security_protocol is "
                             f"{self.security_protocol.value}; use SSL or SASL_SSL")
        return self


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, found {address!r}")
    return host.strip("[]"), int(port)


def map_broker_addresses(client: Any, config: KafkaConnectionConfig) -> None:
    """Connect to the brokers at ``broker_address_map``'s addresses instead of the
    ones they advertise. aiokafka looks every broker (and group coordinator) up
    through ``client.cluster.broker_metadata``; this wraps that one method."""
    mapping = {_split(k): _split(v) for k, v in config.broker_address_map.items()}
    if not mapping:
        return
    cluster: Any = getattr(client, "cluster", None)
    original = getattr(cluster, "broker_metadata", None)
    if original is None:
        raise ConnectorError("broker_address_map is not supported by this aiokafka version")

    def broker_metadata(node_id: Any) -> Any:
        broker = original(node_id)
        if broker is not None:
            target = mapping.get((broker.host, broker.port))
            if target is not None:
                return broker._replace(host=target[0], port=target[1])
        return broker

    cluster.broker_metadata = broker_metadata


def _ssl_context(tls: KafkaTlsConfig | None) -> ssl.SSLContext:
    tls = tls or KafkaTlsConfig()
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file and tls.key_file:
        password = tls.key_password.get_secret_value() if tls.key_password else None
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password)
    return ctx


def client_options(config: KafkaConnectionConfig, context: PluginContext) -> dict[str, Any]:
    """Keyword arguments common to aiokafka's consumer and producer."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(config.bootstrap_servers),
        "client_id": config.client_id or f"natsconn-{context.pipeline}-{context.role}",
        "request_timeout_ms": int(config.request_timeout * 1000),
        "security_protocol": config.security_protocol.value,
    }
    if config.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL):
        try:
            options["ssl_context"] = _ssl_context(config.tls)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectorError(f"kafka tls: cannot load certificates: {exc}") from None
    if config.security_protocol in (SecurityProtocol.SASL_PLAINTEXT,
                                    SecurityProtocol.SASL_SSL):
        options["sasl_mechanism"] = config.sasl_mechanism.value
        options["sasl_plain_username"] = config.username
        assert config.password is not None
        options["sasl_plain_password"] = config.password.get_secret_value()
    return options


class _Capture:
    """aiokafka's lines while one client starts."""

    __slots__ = ("lines", "open")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.open = True


# The start in progress in this task (and in the tasks it creates). A context
# variable, not a process-wide list: clients of other pipelines starting at the
# same time must neither see these lines nor have their own lines swallowed.
_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "natsconn_kafka_capture", default=None)


class _AiokafkaLogs(logging.Filter):
    """aiokafka's warnings and errors, tamed.

    While a client starts, its lines are collected (for the one error natsconn
    raises) and not logged. Otherwise each kind of line (its template) is logged
    once per ``window`` seconds, with a count of the ones held back: a broker
    outage costs a few lines, not a thousand (aiokafka logs every reconnect
    attempt, ten a second).
    """

    window = 30.0

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, str], list[float]] = {}  # -> [until, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        capture = _CAPTURE.get()
        if capture is not None and capture.open:
            message = record.getMessage()
            # aiokafka formats the error with %s: ConnectionResetError() reads as
            # nothing at all. Name its type then.
            last = record.args[-1] if isinstance(record.args, tuple) and record.args else None
            if isinstance(last, BaseException) and not str(last):
                message += type(last).__name__
            capture.lines.append(message)
            return False
        key = (record.name, str(record.msg))
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = [now + self.window, 0]
        if entry is not None and entry[1]:
            record.msg = (f"{record.getMessage()} ({int(entry[1])} more like it in the last "
                          f"{self.window:g}s not logged)")
            record.args = None
        return True


_FILTER = _AiokafkaLogs()
for _name in ("aiokafka", "aiokafka.conn", "aiokafka.cluster", "aiokafka.consumer.consumer",
              "aiokafka.consumer.fetcher", "aiokafka.consumer.group_coordinator",
              "aiokafka.consumer.subscription_state", "aiokafka.producer.producer",
              "aiokafka.producer.sender", "aiokafka.producer.message_accumulator"):
    logging.getLogger(_name).addFilter(_FILTER)


def _cause(lines: list[str], exc: BaseException) -> str:
    """The most telling reason among aiokafka's captured lines and the exception."""
    for needle in ("Authentication", "SaslAuthenticationFailed", "IllegalSaslState",
                   "UnsupportedSaslMechanism", "SSL", "certificate"):
        for line in lines:
            if needle in line:
                return _strip(line)
    for line in lines:
        if line.startswith("Unable connect to"):
            return _strip(line)
    return str(exc) or type(exc).__name__


def _strip(line: str) -> str:
    # 'Unable connect to "h:p": [Error 58] SaslAuthenticationFailed: text' -> the text part
    head, sep, tail = line.partition('": ')
    if sep and head.startswith("Unable connect to"):
        where = head.removeprefix('Unable connect to "')
        if "IllegalSaslState" in tail:
            tail += (" (the listener does not speak SASL: check security_protocol and "
                     "the port)")
        return f"{where}: {tail}"
    return line


async def start_client(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    config: KafkaConnectionConfig,
    what: str,
) -> None:
    """Run ``start`` within ``connect_timeout``; on failure stop the client and raise
    one :class:`RetryableError` that names the servers and the cause."""
    capture = _Capture()
    lines = capture.lines
    token = _CAPTURE.set(capture)
    try:
        await asyncio.wait_for(start(), config.connect_timeout)
    except Exception as exc:
        servers = ", ".join(config.bootstrap_servers)
        if isinstance(exc, TimeoutError):
            reason = (f"no answer within connect_timeout {config.connect_timeout:g}s"
                      + (f" ({_cause(lines, exc)})" if lines else ""))
        else:
            reason = _cause(lines, exc)
        if len(config.bootstrap_servers) == 1:
            reason = reason.removeprefix(f"{config.bootstrap_servers[0]}: ")
        if config.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL) and (
                "ConnectionResetError" in reason or "closed" in reason):
            reason += (" (the broker closed the connection during the TLS handshake: is "
                       "this a TLS listener? check security_protocol and the port)")
        elif reason.endswith(" closed"):
            reason += (" (the broker closed the connection at once: if this listener wants "
                       "TLS, use security_protocol SSL or SASL_SSL)")
        with contextlib.suppress(Exception):  # the start error is the one worth reporting
            await stop()
        raise RetryableError(f"cannot start Kafka {what} at {servers}: {reason}") from None
    finally:
        capture.open = False  # tasks the client started keep the variable: log normally
        _CAPTURE.reset(token)
