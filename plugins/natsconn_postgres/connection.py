"""Connection options shared by the three PostgreSQL plugins, and how to connect.

SSL is what the options say, never less: ``require`` fails against a server
without SSL instead of falling back to plain text, and libpq's ``prefer`` and
``allow`` (which do fall back silently) are refused. The ``sslmode`` of a DSN
is read the same way; it may not contradict ``ssl.mode``.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from pydantic import Field, SecretStr, model_validator

from connector import (
    ConfigError,
    ConnectorError,
    Duration,
    PluginConfig,
    PluginContext,
    RetryableError,
)


class SslMode(StrEnum):
    disable = "disable"
    require = "require"
    verify_ca = "verify-ca"
    verify_full = "verify-full"


class SslConfig(PluginConfig):
    mode: SslMode | None = Field(
        None, description="disable, require (encrypted; the certificate is checked against "
        "ca_file when one is given), verify-ca (certificate signed by a trusted CA), "
        "verify-full (verify-ca and the host name matches). Default: the DSN's sslmode, "
        "else disable")
    ca_file: str | None = Field(None, description="CA bundle to verify the server with; "
                                "default: the system's trust store")
    cert_file: str | None = Field(None, description="client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="client private key (mutual TLS)")


class PostgresConnectionConfig(PluginConfig):
    dsn: SecretStr | None = Field(
        None, description="postgresql://user:password@host:port/database?sslmode=...; "
        "fields given beside it override its parts")
    host: str | None = Field(None, description="server host; default 127.0.0.1 (or the DSN's)")
    port: int | None = Field(None, ge=1, le=65535, description="default 5432 (or the DSN's)")
    user: str | None = None
    password: SecretStr | None = None
    database: str | None = None
    ssl: SslConfig = Field(default_factory=SslConfig, description="mode (disable, require, "
                           "verify-ca, verify-full), ca_file, cert_file, key_file")
    pool_size: int = Field(4, ge=1, le=1000, description="most connections this plugin opens")
    statement_timeout: Duration = Field(
        60.0, description="server-side limit per statement; 0 for none")
    command_timeout: Duration | None = Field(
        None, gt=0, description="client-side limit per command: past it a stalled or dead "
        "connection is given up and the write retried on a new one; default "
        "statement_timeout + 10s (none when statement_timeout is 0)")
    connect_timeout: Duration = Field(10.0, gt=0, description="longest wait for a connection")
    reconnect_wait: Duration = Field(0.5, gt=0, description="first wait before reconnecting; "
                                     "doubles up to reconnect_wait_max")
    reconnect_wait_max: Duration = Field(30.0, gt=0, description="longest wait between "
                                         "reconnect attempts")
    application_name: str | None = Field(
        None, description="shown in pg_stat_activity; default natsconn:<pipeline>:<role>")

    @model_validator(mode="after")
    def _ssl_agrees_with_dsn(self) -> PostgresConnectionConfig:
        resolved_ssl_mode(self)  # raises ValueError on a contradiction
        if bool(self.ssl.cert_file) != bool(self.ssl.key_file):
            raise ValueError("ssl: cert_file and key_file go together")
        return self


_SSL_QUERY_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey")


def _dsn_ssl(dsn: str) -> dict[str, str]:
    query = dict(parse_qsl(urlsplit(dsn).query))
    return {k: query[k] for k in _SSL_QUERY_KEYS if k in query}


def resolved_ssl_mode(cfg: PostgresConnectionConfig) -> SslMode:
    """The mode in force: ``ssl.mode``, else the DSN's ``sslmode``, else disable."""
    from_dsn = _dsn_ssl(cfg.dsn.get_secret_value()).get("sslmode") if cfg.dsn else None
    if from_dsn is not None:
        try:
            dsn_mode = SslMode(from_dsn)
        except ValueError:
            raise ValueError(
                f"expected sslmode disable, require, verify-ca or verify-full in the DSN, "
                f"found {from_dsn!r} (prefer and allow may fall back to plain text "
                "silently and are not supported)") from None
        if cfg.ssl.mode is not None and cfg.ssl.mode != dsn_mode:
            raise ValueError(f"ssl.mode {cfg.ssl.mode.value!r} contradicts the DSN's "
                             f"sslmode={from_dsn}; give one of them")
        return dsn_mode
    return cfg.ssl.mode or SslMode.disable


def ssl_context(cfg: PostgresConnectionConfig) -> ssl.SSLContext | bool:
    """``False`` for disable, else a context asyncpg must use (never advisory)."""
    mode = resolved_ssl_mode(cfg)
    if mode is SslMode.disable:
        return False
    from_dsn = _dsn_ssl(cfg.dsn.get_secret_value()) if cfg.dsn else {}
    ca_file = cfg.ssl.ca_file or from_dsn.get("sslrootcert")
    cert_file = cfg.ssl.cert_file or from_dsn.get("sslcert")
    key_file = cfg.ssl.key_file or from_dsn.get("sslkey")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if mode is SslMode.require and ca_file is None:
        # Encrypted, certificate not checked (libpq's require without a root cert).
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif mode is not SslMode.verify_full:
        # require with a CA (as libpq does) and verify-ca: the chain, not the name.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise ConfigError("ssl: cert_file and key_file go together")
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def connect_kwargs(cfg: PostgresConnectionConfig, context: PluginContext) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` / ``create_pool``."""
    kwargs: dict[str, Any] = {}
    if cfg.dsn is not None:
        parts = urlsplit(cfg.dsn.get_secret_value())
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in _SSL_QUERY_KEYS]
        kwargs["dsn"] = urlunsplit(parts._replace(query=urlencode(query)))
        if cfg.host is not None or cfg.port is not None:
            # asyncpg drops the DSN's port when given a host (and its host when
            # given a port): pass both, each from the field or else the DSN.
            kwargs["host"] = cfg.host or parts.hostname or "127.0.0.1"
            kwargs["port"] = cfg.port or parts.port or 5432
    else:
        kwargs["host"] = cfg.host or "127.0.0.1"
        kwargs["port"] = cfg.port or 5432
    for name in ("user", "database"):
        value = getattr(cfg, name)
        if value is not None:
            kwargs[name] = value
    if cfg.password is not None:
        kwargs["password"] = cfg.password.get_secret_value()
    kwargs["ssl"] = ssl_context(cfg)
    kwargs["timeout"] = cfg.connect_timeout
    settings = {
        "application_name": (cfg.application_name
                             or f"natsconn:{context.pipeline}:{context.role}")[:63],
    }
    if cfg.statement_timeout > 0:
        settings["statement_timeout"] = str(max(1, int(cfg.statement_timeout * 1000)))
    kwargs["server_settings"] = settings
    command_timeout = command_timeout_of(cfg)
    if command_timeout is not None:
        kwargs["command_timeout"] = command_timeout
    return kwargs


def command_timeout_of(cfg: PostgresConnectionConfig) -> float | None:
    """How long the client waits for any one command. Without a limit, a server
    that stops answering with the connection still open (a stall, a dead host
    without a reset) holds a write until the kernel gives the socket up, many
    minutes later; the server's own statement_timeout cannot help there."""
    if cfg.command_timeout is not None:
        return cfg.command_timeout
    if cfg.statement_timeout > 0:
        return cfg.statement_timeout + 10.0
    return None


def describe(cfg: PostgresConnectionConfig) -> str:
    """Where we connect, for messages: host:port/database, never a password."""
    host, port, database = cfg.host, cfg.port, cfg.database
    if cfg.dsn is not None:
        parts = urlsplit(cfg.dsn.get_secret_value())
        host = host or parts.hostname
        port = port or parts.port
        database = database or parts.path.lstrip("/") or None
    return f"{host or '127.0.0.1'}:{port or 5432}/{database or '(default database)'}"


def connect_error(cfg: PostgresConnectionConfig, exc: BaseException) -> ConnectorError:
    """A failed connection attempt as a ConnectorError that names the server.

    Bad credentials and a missing database are not cured by waiting, but they
    stay retryable: an operator may fix the server while natsconn keeps trying.
    """
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLError | ssl.CertificateError) or "SSL" in reason:
        reason = f"SSL: {reason}"
    return RetryableError(f"cannot connect to PostgreSQL at {describe(cfg)}: {reason}")


async def open_pool(
    cfg: PostgresConnectionConfig,
    context: PluginContext,
    *,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    size: int | None = None,
) -> asyncpg.Pool:
    """A pool of ``pool_size`` connections; one is opened now, so that a wrong
    address or password shows at connect time. Lost connections are replaced
    on the next acquire: that is the reconnect, paced by the engine's backoff."""
    kwargs = connect_kwargs(cfg, context)
    try:
        pool = await asyncpg.create_pool(
            min_size=1, max_size=size or cfg.pool_size, init=init,
            max_inactive_connection_lifetime=300.0, **kwargs)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise connect_error(cfg, exc) from None
    assert pool is not None
    return pool


async def open_connection(cfg: PostgresConnectionConfig, context: PluginContext
                          ) -> asyncpg.Connection:
    """One dedicated connection (LISTEN needs its own)."""
    try:
        return await asyncpg.connect(**connect_kwargs(cfg, context))
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise connect_error(cfg, exc) from None


def pg_error_text(exc: BaseException) -> str:
    """The database's error as one line: SQLSTATE, message, detail, hint."""
    if isinstance(exc, asyncpg.PostgresError):
        text = f"{exc.sqlstate}: {exc.args[0] if exc.args else exc}"
        detail = getattr(exc, "detail", None)
        hint = getattr(exc, "hint", None)
        if detail:
            text += f" DETAIL: {detail}"
        if hint:
            text += f" HINT: {hint}"
        return " ".join(text.split())
    return " ".join((str(exc) or type(exc).__name__).split())


def is_row_error(exc: BaseException) -> bool:
    """A failure caused by the data of some row, which bisecting can find:
    SQLSTATE class 22 (data exception) or 23 (integrity constraint
    violation), or the client failing to encode a value."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state.startswith(("22", "23"))
    return isinstance(exc, TypeError | ValueError | OverflowError) and not isinstance(
        exc, asyncpg.InterfaceError | ConnectorError)


def is_connection_lost(exc: BaseException) -> bool:
    """The session is gone (server restart, network cut, admin shutdown): the
    pool's other idle connections are most likely dead as well."""
    return isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError
                      | asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError
                      | asyncpg.AdminShutdownError | asyncpg.CrashShutdownError)


async def forget_connections(pool: asyncpg.Pool, exc: BaseException) -> None:
    """After a lost session, have every pooled connection replaced on its next
    use, so that one retry finds a live server instead of one per dead connection."""
    if is_connection_lost(exc):
        await pool.expire_connections()


def retryable(exc: BaseException, what: str = "postgres") -> RetryableError:
    """Any other failure: connection lost, timeout, server restarting, lock
    conflict, or a schema problem an operator can fix while we retry."""
    return RetryableError(f"{what}: {type(exc).__name__}: {pg_error_text(exc)}")


class Backoff:
    """Doubling waits between reconnect attempts, reset after a success."""

    def __init__(self, first: float, most: float) -> None:
        self.first = first
        self.most = most
        self._next = first

    def next(self) -> float:
        wait = self._next
        self._next = min(self.most, self._next * 2)
        return wait

    def reset(self) -> None:
        self._next = self.first


def quote_ident(name: str) -> str:
    """An identifier, quoted exactly as written (case-sensitive)."""
    return '"' + name.replace('"', '""') + '"'


def split_table(name: str) -> tuple[str | None, str]:
    """``schema.table`` or ``table`` (no dots inside names)."""
    schema, dot, table = name.rpartition(".")
    if not table or (dot and not schema):
        raise ValueError(f"expected a table name such as 'events' or 'public.events', "
                         f"found {name!r}")
    return (schema or None), table


def quote_table(name: str) -> str:
    schema, table = split_table(name)
    return f"{quote_ident(schema)}.{quote_ident(table)}" if schema else quote_ident(table)
