"""Connection options shared by the seven Redis plugins, and the one connect call.

Every plugin builds its client with :func:`open_link`, so URL parsing, ACL
credentials, TLS, timeouts and the reconnect policy live here only. A
:class:`RedisLink` also watches the connection: the first failure of an outage
(seen by redis-py's retry loop or by the plugin) counts ``disconnected`` and
logs one warning; the plugin's next successful operation (a read, a write, a
subscription) counts ``reconnected`` and logs how long the outage lasted. A bare
TCP connect does not end an outage: a restarting Redis accepts connections
while it still answers LOADING.

TLS is verified whenever it is configured; there is no switch to turn
verification off.

With ``cluster: true`` the client is redis-py's ``RedisCluster``: the URL (or
host/port) and ``cluster_nodes`` are startup nodes, the rest of the cluster is
discovered, every command goes to the master of its key's slot, MOVED and ASK
are followed, and a failover is a retryable error until the new master is
known. A server that is a cluster node while ``cluster`` is false is refused
at connect (its MOVED replies would otherwise look like refused commands).

Timeouts are kept once per round trip, not once per reply. redis-py applies
``socket_timeout`` to every reply it reads (and wraps every write in
``wait_for``), which costs about a quarter of the CPU of a pipelined batch of
a thousand commands. So the clients are built with ``socket_timeout=None``
and every round trip runs under :meth:`RedisLink.deadline`: ``socket_timeout``
for the whole exchange (a blocking read adds its block time). When the
deadline passes, the cancellation reaches redis-py inside its read or write,
where it disconnects the connection (a reply half read would desynchronise
it); the connection is reconnected on its next use. The expiry surfaces as
redis' own :class:`~redis.exceptions.TimeoutError`, so it is mapped (retryable,
the outage counted) exactly as a socket timeout was.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ClassVar, TypeVar, cast
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ConnectionError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from connector import (
    ConnectorError,
    Duration,
    PluginConfig,
    PluginContext,
    RejectedError,
    RetryableError,
)

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis comes with the redis extra
    hiredis = None  # type: ignore[assignment]

T = TypeVar("T")

_URL_SCHEMES = ("redis", "rediss", "unix")
# How bytes that are not UTF-8 become text and back, both ways, as for Kafka's
# headers: a lone surrogate per such byte, so nothing is replaced or lost.
TEXT_ERRORS = "surrogateescape"
# Error codes after which the same command may well succeed later.
_TRANSIENT_CODES = frozenset({
    "BUSY", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "MISCONF", "NOREPLICAS", "OOM",
    "READONLY", "TRYAGAIN",
})


class TlsConfig(PluginConfig):
    ca_file: str | None = Field(None, description="CA bundle to verify the server with; "
                                "the system's CAs when unset")
    cert_file: str | None = Field(None, description="client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="client private key (mutual TLS)")
    check_hostname: bool = Field(True, description="check that the server certificate "
                                 "names the host connected to")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls: cert_file and key_file go together")
        return self


class ReconnectConfig(PluginConfig):
    initial_backoff: Duration = Field(0.05, description="first wait before reconnecting")
    max_backoff: Duration = Field(2.0, description="longest wait between attempts")
    attempts: int = Field(5, ge=0, description="reconnect attempts per command before the "
                          "error goes to the engine, which retries with its own backoff")


class RedisConnectionConfig(PluginConfig):
    """Where Redis is and how to talk to it: a URL, or host/port/db."""

    # Commands on keys, which a cluster node answers with MOVED unless it owns the
    # slot; pub/sub is not keyed: any node of a cluster serves it.
    keyed: ClassVar[bool] = True

    url: str | None = Field(None, description="redis://host:port/db, rediss:// (TLS) or "
                            "unix:///path?db=N; instead of host/port/db")
    host: str = "127.0.0.1"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0)
    username: str | None = Field(None, description="ACL user; 'default' when only a "
                                 "password is given")
    password: SecretStr | None = None
    tls: TlsConfig | None = Field(None, description="TLS options; a rediss:// URL turns TLS "
                                  "on by itself")
    client_name: str | None = Field(None, description="CLIENT SETNAME; defaults to "
                                    "natsconn:<pipeline>:<role>")
    connect_timeout: Duration = Field(5.0, gt=0)
    socket_timeout: Duration = Field(10.0, gt=0, description="longest wait for a round "
                                     "trip (a pipelined batch, a read, an ack); a "
                                     "blocking read may wait its block time more")
    health_check_interval: Duration = Field(30.0, description="PING a connection idle this "
                                            "long before using it; 0 turns it off")
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    cluster: bool = Field(False, description="Redis Cluster: url (or host/port) and "
                          "cluster_nodes are startup nodes, the others are discovered; "
                          "keys that one command or script uses together need one "
                          "{hash tag}")
    cluster_nodes: list[str] = Field(default_factory=list, description="more startup "
                                     "nodes as host:port, for cluster: true")

    @model_validator(mode="after")
    def _url(self) -> RedisConnectionConfig:
        if self.cluster_nodes and not self.cluster:
            raise ValueError("cluster_nodes is for cluster: true")
        for node in self.cluster_nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"cluster_nodes: expected host:port, found {node!r}")
        if self.cluster and self.db != 0:
            raise ValueError("a Redis Cluster has database 0 only; drop db")
        if self.url is None:
            return self
        clash = {"host", "port", "db"} & self.model_fields_set
        if clash:
            raise ValueError(f"give either url or {'/'.join(sorted(clash))}, not both")
        parts = urlsplit(self.url)
        if parts.scheme not in _URL_SCHEMES:
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, found "
                             f"scheme {parts.scheme!r}")
        if parts.password and self.password is not None:
            raise ValueError("the password is given twice: in url and in password")
        if parts.scheme == "unix" and self.tls is not None:
            raise ValueError("tls options need a redis:// or rediss:// URL, not unix://")
        if self.cluster and parts.scheme == "unix":
            raise ValueError("cluster: true needs redis:// or rediss:// startup nodes, not "
                             "a unix socket")
        if self.cluster and parts.path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has database 0 only; drop the /db of url")
        return self

    def describe(self) -> str:
        """The server's address for messages, never with credentials."""
        if self.url is None:
            return f"{self.host}:{self.port}/{self.db}"
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return f"unix:{parts.path}"
        host = parts.hostname or "localhost"
        port = parts.port or 6379
        db = parts.path.strip("/") or "0"
        return f"{host}:{port}/{db}"

    def user(self) -> str:
        if self.username:
            return self.username
        if self.url is not None:
            name = urlsplit(self.url).username
            if name:
                return name
        return "default"


class Deadline:
    """``async with``: the round trip inside must end within ``limit`` seconds.

    On expiry redis-py sees a cancellation mid-read or mid-write and drops the
    connection; the caller gets redis' ``TimeoutError``, as from a socket
    timeout. One :func:`asyncio.timeout` per round trip, instead of one per reply.
    """

    __slots__ = ("_limit", "_timeout")

    def __init__(self, limit: float) -> None:
        self._limit = limit

    async def __aenter__(self) -> None:
        self._timeout = asyncio.timeout(self._limit)
        await self._timeout.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except builtins.TimeoutError:
            raise TimeoutError(f"no reply from redis within {self._limit:g}s") from None


class RedisLink:
    """A client (its connection pool) and the connection state behind the meters.

    With ``per_reply_timeout`` the client keeps redis-py's own socket timeout
    (the pub/sub source: its reads carry their own timeouts, and its reconnects
    run inside redis-py); otherwise every round trip must be made under
    :meth:`deadline`.
    """

    def __init__(self, config: RedisConnectionConfig, context: PluginContext,
                 per_reply_timeout: bool = False) -> None:
        self.config = config
        self.context = context
        self.where = config.describe()
        self.down_since: float | None = None
        self.was_up = False  # an outage needs a connection that worked first
        self.cluster = config.cluster
        # A RedisCluster has the same command methods (typed as Redis for the plugins).
        self.client: Redis = (cast(Redis, _make_cluster(config, context, self))
                              if config.cluster
                              else _make_client(config, context, self, per_reply_timeout))

    def deadline(self, extra: float = 0.0) -> Deadline:
        """The limit of one round trip: ``socket_timeout``, plus ``extra`` (the block
        time of a blocking read)."""
        return Deadline(self.config.socket_timeout + extra)

    # -- connection state -------------------------------------------------------

    def lost(self, exc: BaseException) -> None:
        """A command failed on the connection; counted once per outage."""
        if self.down_since is not None or not self.was_up:
            return
        self.down_since = time.monotonic()
        self.context.meters.disconnected()
        self.context.logger.warning("redis at %s: connection lost (%s); reconnecting",
                                    self.where, _reason(exc))

    def restored(self) -> None:
        """An operation succeeded; ends an outage if there was one."""
        if self.down_since is None:
            self.was_up = True
            return
        outage = time.monotonic() - self.down_since
        self.down_since = None
        self.context.meters.reconnected()
        self.context.logger.info("redis at %s: reconnected after %.1fs", self.where, outage)

    # -- lifecycle --------------------------------------------------------------

    async def check(self) -> None:
        """Connect and authenticate now, so that a bad address or password is one
        clear error from ``connect()`` rather than a failure on the first read."""
        try:
            async with self.deadline(self.config.connect_timeout):
                await self.client.ping()
        except NoPermissionError:
            pass  # authenticated, but the ACL forbids PING: that is fine
        except Exception as exc:
            await self.close()
            raise connect_error(self.config, exc) from None
        if not self.cluster and self.config.keyed:
            try:
                async with self.deadline():
                    info = await self.client.info("cluster")
            except Exception:  # an ACL without INFO, an old server: not known
                info = {}
            if str(info.get("cluster_enabled", "0")) == "1":
                await self.close()
                raise ConnectorError(
                    f"redis at {self.where} is a Redis Cluster node; set cluster: true "
                    "(a plain client would get MOVED for most keys)")
        self.restored()

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception as exc:
            self.context.logger.debug("closing redis client: %s", exc)


class _WatchedRetry(Retry):
    """redis-py's retry with backoff, which also tells the link about failures.

    Authentication errors are never retried: a wrong password stays wrong.
    The same instance serves every connection of the pool (no deep copies), so
    the link sees the whole client.
    """

    def __init__(self, link: RedisLink, reconnect: ReconnectConfig) -> None:
        backoff = ExponentialWithJitterBackoff(base=reconnect.initial_backoff,
                                               cap=reconnect.max_backoff)
        super().__init__(backoff, reconnect.attempts, (ConnectionError, TimeoutError))
        self._link = link

    def __deepcopy__(self, memo: dict[int, Any]) -> _WatchedRetry:
        return self

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        link = self._link

        def retryable(exc: Exception) -> bool:
            if isinstance(exc, AuthenticationError | AuthorizationError):
                return False
            return is_retryable is None or is_retryable(exc)

        async def failed(*args: Any) -> None:
            link.lost(args[0])
            result = fail(*args)
            if inspect.isawaitable(result):
                await result

        try:
            return await super().call_with_retry(do, failed, retryable, with_failure_count)
        except (ConnectionError, TimeoutError) as exc:
            if not isinstance(exc, AuthenticationError | AuthorizationError):
                link.lost(exc)
            raise


def _make_cluster(config: RedisConnectionConfig, context: PluginContext,
                  link: RedisLink) -> RedisCluster:
    """A RedisCluster with the options of :func:`_make_client`. Its own loop retries
    a command after a MOVED, a CLUSTERDOWN or a lost node (rediscovering the
    slots); ``reconnect.attempts`` bounds how often, ``reconnect`` the backoff."""
    reconnect = config.reconnect
    backoff = ExponentialWithJitterBackoff(base=reconnect.initial_backoff,
                                           cap=reconnect.max_backoff)
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": config.connect_timeout,
        "socket_timeout": None,  # the callers' deadline() covers each round trip
        "socket_keepalive": True,
        "health_check_interval": int(config.health_check_interval),
        "client_name": config.client_name or _client_name(context),
        "retry": Retry(backoff, reconnect.attempts),
        "decode_responses": False,
        # natsconn's text (subjects, headers) holds bytes that are not UTF-8 as lone
        # surrogates (a Kafka header, a Redis field): they go back as those bytes.
        "encoding_errors": TEXT_ERRORS,
        "protocol": 2,
    }
    if config.username:
        kwargs["username"] = config.username
    if config.password is not None:
        kwargs["password"] = config.password.get_secret_value()
    tls = config.tls
    use_tls = tls is not None or (config.url or "").startswith("rediss://")
    if tls is not None:
        kwargs.update(ssl_ca_certs=tls.ca_file, ssl_certfile=tls.cert_file,
                      ssl_keyfile=tls.key_file, ssl_check_hostname=tls.check_hostname)
    if use_tls:
        kwargs.update(ssl=True, ssl_cert_reqs="required")
    if config.url is not None:
        parts = urlsplit(config.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        if parts.username and not config.username:
            kwargs["username"] = parts.username
        if parts.password and config.password is None:
            kwargs["password"] = parts.password
    else:
        host, port = config.host, config.port
    nodes = [ClusterNode(host, port)]
    for node in config.cluster_nodes:
        h, _, p = node.rpartition(":")
        nodes.append(ClusterNode(h, int(p)))
    client = RedisCluster(startup_nodes=nodes, **kwargs)
    # Every node's connections pack with hiredis, as the single-server client's do.
    client.connection_kwargs["connection_class"] = _packing(
        SSLConnection if use_tls else Connection)
    return client


def same_slot(*keys: str) -> bool:
    """The keys hash to one cluster slot (they share a {hash tag}, or are equal)."""
    return len({key_slot(k.encode()) for k in keys}) <= 1


def _make_client(config: RedisConnectionConfig, context: PluginContext,
                 link: RedisLink, per_reply_timeout: bool) -> Redis:
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": config.connect_timeout,
        # None: no timeout per reply read; the callers' deadline() covers each round trip.
        "socket_timeout": config.socket_timeout if per_reply_timeout else None,
        "socket_keepalive": True,
        "health_check_interval": int(config.health_check_interval),
        "client_name": config.client_name or _client_name(context),
        "retry": _WatchedRetry(link, config.reconnect),
        "decode_responses": False,
        "encoding_errors": TEXT_ERRORS,  # as for the cluster, above
        "protocol": 2,
    }
    if config.username:
        kwargs["username"] = config.username
    if config.password is not None:
        kwargs["password"] = config.password.get_secret_value()
    tls = config.tls
    if tls is not None:
        kwargs.update(ssl=True, ssl_ca_certs=tls.ca_file, ssl_certfile=tls.cert_file,
                      ssl_keyfile=tls.key_file, ssl_check_hostname=tls.check_hostname,
                      ssl_cert_reqs="required")
    if config.url is not None:
        # With a URL the scheme picks the connection class: a tls block upgrades
        # redis:// to rediss://, and unix sockets take no TCP options.
        url = config.url
        kwargs.pop("ssl", None)
        scheme = urlsplit(url).scheme
        if scheme == "redis" and tls is not None:
            url = "rediss" + url[len("redis"):]
        elif scheme == "unix":
            kwargs.pop("socket_keepalive")
        client = Redis.from_url(url, **kwargs)
    else:
        client = Redis(host=config.host, port=config.port, db=config.db, **kwargs)
    pool = client.connection_pool
    pool.connection_class = _packing(pool.connection_class)
    return client


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """``base`` packing commands with hiredis (C) instead of redis-py's Python code.

    redis-py's asyncio connections pack in Python, which costs about half the
    CPU of a pipelined XADD batch; its sync client already uses hiredis for
    this. Arguments hiredis cannot pack go the original way.
    """
    if hiredis is None:
        return base
    made = _PACKING.get(base)
    if made is not None:
        return made
    pack = hiredis.pack_command

    class HiredisPacking(base):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            first = args[0]
            if isinstance(first, str) and " " in first:
                args = (*first.split(), *args[1:])
            try:
                return [pack(args)]
            except (TypeError, UnicodeEncodeError):
                # hiredis encodes text strictly; redis-py with encoding_errors
                # (surrogateescape) writes a lone surrogate back as its byte
                return super().pack_command(*args)  # type: ignore[no-any-return]

        def pack_commands(self, commands: Any) -> list[bytes]:
            out: list[bytes] = []
            for command in commands:
                out.extend(self.pack_command(*command))
            return [b"".join(out)]

    HiredisPacking.__name__ = f"HiredisPacking{base.__name__}"
    _PACKING[base] = HiredisPacking
    return HiredisPacking


def _client_name(context: PluginContext) -> str:
    name = f"natsconn:{context.pipeline}:{context.role}"
    return "".join(c if c.isprintable() and not c.isspace() else "_" for c in name)


async def open_link(config: RedisConnectionConfig, context: PluginContext,
                    per_reply_timeout: bool = False) -> RedisLink:
    """A checked connection: raises at once on a wrong address or password."""
    link = RedisLink(config, context, per_reply_timeout)
    await link.check()
    return link


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def connect_error(config: RedisConnectionConfig, exc: BaseException) -> ConnectorError:
    """What ``connect()`` raises: not retryable for credentials, retryable otherwise."""
    where = config.describe()
    text = str(exc).strip()
    if isinstance(exc, AuthenticationError) or text.startswith(("WRONGPASS", "NOAUTH")):
        return ConnectorError(
            f"redis at {where}: authentication failed for user {config.user()!r}: "
            f"{text or type(exc).__name__}")
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return RetryableError(f"cannot connect to redis at {where}: {_reason(exc)}"
                              f"{_tls_hint(config, exc)}")
    return ConnectorError(f"redis at {where}: {_reason(exc)}")


def _tls_hint(config: RedisConnectionConfig, exc: BaseException) -> str:
    """Why a connect most likely failed when TLS and the port disagree: a plain
    Redis port never answers a TLS handshake (a timeout), a TLS port resets a
    plain connection."""
    tls = config.tls is not None or (config.url or "").startswith("rediss://")
    text = str(exc)
    if "SSL" in text or "certificate" in text:
        return ""
    if tls and isinstance(exc, TimeoutError):
        return " (no answer to the TLS handshake: is this a TLS port?)"
    if tls and ("reset" in text or "closed" in text):
        # TLS 1.3: the server checks the client certificate after the handshake,
        # so a missing or untrusted one often shows as a bare reset.
        return (" (the server ended the TLS session: does it want a client certificate "
                "(tls.cert_file, tls.key_file), or not trust the one given?)")
    if not tls and ("reset" in text or "closed" in text):
        return (" (the server closed the connection: if this port wants TLS, use a "
                "rediss:// URL or a tls block)")
    return ""


def is_connection_error(exc: BaseException) -> bool:
    """redis' ConnectionError and TimeoutError, and the builtin ones (a builtin
    TimeoutError, e.g. from an ``asyncio.timeout``, is an OSError too)."""
    return isinstance(exc, ConnectionError | TimeoutError | builtins.TimeoutError | OSError)


# A cluster between masters (failover, resharding): redis-py parses the error code
# into the class and keeps only the text after it, so these are told by class.
_CLUSTER_TRANSIENT = (ClusterDownError, ClusterError, TryAgainError, AskError,
                      SlotNotCoveredError)


def command_error(exc: BaseException) -> RetryableError | RejectedError:
    """One command's failure as the engine's kind: retry, or poison for this message."""
    if isinstance(exc, RetryableError | RejectedError):
        return exc
    if is_connection_error(exc) or isinstance(exc, BusyLoadingError):
        return RetryableError(f"redis: {_reason(exc)}")
    if isinstance(exc, _CLUSTER_TRANSIENT):
        return RetryableError(f"redis cluster: {_reason(exc)}")
    if isinstance(exc, OutOfMemoryError | ReadOnlyError):
        return RetryableError(f"redis: {_reason(exc)}")
    text = str(exc).strip()
    code = text.split(" ", 1)[0]
    if code in _TRANSIENT_CODES:
        return RetryableError(f"redis: {text}")
    if isinstance(exc, ResponseError):
        return RejectedError(f"redis refused the command: {text}")
    if isinstance(exc, RedisError):
        return RetryableError(f"redis: {_reason(exc)}")
    return RetryableError(f"redis client: {_reason(exc)}")


def read_error(link: RedisLink, exc: BaseException, what: str) -> ConnectorError:
    """A failure while reading or acknowledging, for a source."""
    if is_connection_error(exc) or isinstance(exc, BusyLoadingError):
        link.lost(exc)
        return RetryableError(f"redis at {link.where}: {what}: {_reason(exc)}")
    if isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in _TRANSIENT_CODES:
        return RetryableError(f"redis at {link.where}: {what}: {exc}")
    if isinstance(exc, _CLUSTER_TRANSIENT):
        link.lost(exc)
        return RetryableError(f"redis cluster at {link.where}: {what}: {_reason(exc)}")
    return ConnectorError(f"redis at {link.where}: {what}: {_reason(exc)}")
