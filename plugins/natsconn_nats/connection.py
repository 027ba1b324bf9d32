"""Connection options shared by the four NATS plugins, and the connect call.

TLS is verified whenever it is configured; there is no switch to turn
verification off, and natsconn never falls back to plain text by itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from pydantic import Field, SecretStr, field_validator

from connector import ConnectorError, Duration, PluginConfig, PluginContext, RetryableError


class TlsConfig(PluginConfig):
    ca_file: str | None = Field(None, description="CA bundle to verify the server with")
    cert_file: str | None = Field(None, description="client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="client private key (mutual TLS)")
    hostname: str | None = Field(None, description="expected server name, if not the URL's")
    handshake_first: bool = Field(False, description="TLS before the NATS INFO (server "
                                  "option handshake_first)")


class NatsConnectionConfig(PluginConfig):
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"],
                               min_length=1, description="NATS server URLs")
    name: str | None = Field(None, description="connection name shown by the server; "
                             "defaults to natsconn:<pipeline>:<role>")
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    nkey_seed: SecretStr | None = Field(None, description="an NKey seed (SU...)")
    creds_file: str | None = Field(None, description="a .creds file (user JWT and seed)")
    tls: TlsConfig | None = None
    connect_timeout: Duration = 5.0
    reconnect_wait: Duration = 1.0
    max_reconnect_attempts: int = Field(-1, description="-1: reconnect for ever")
    ping_interval: Duration = 20.0

    @field_validator("creds_file")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"expected a readable creds file, found no file at {value!r}")
        return value


_INVALID_SUBJECT = re.compile(r"[ \t\r\n]")
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNK = 1024 * 1024  # bytes of commands handed to the client at a time
# Our own PING object, told apart from other pending commands by identity.
_PING = bytes(bytearray(b"PING\r\n"))
_GOOD_SUBJECTS: set[str] = set()  # subjects and header names already checked
_GOOD_KEYS: set[str] = set()


def encode_publish(subject: str, payload: bytes, headers: Mapping[str, str] | None = None,
                   reply: str = "") -> bytes:
    """One PUB or HPUB command. Stricter than nats-py's publish(): what would be
    lost or altered on the way is refused (``BadSubjectError``,
    ``BadHeaderError``, ``UnicodeError``), and the sinks reject that message."""
    if subject not in _GOOD_SUBJECTS:
        # No whitespace (CRLF would inject protocol), no empty token (`a..b`: the
        # server takes it and no subscriber or stream ever sees it), no wildcard.
        if not subject or _INVALID_SUBJECT.search(subject) or any(
            not token or token in ("*", ">") for token in subject.split(".")
        ):
            raise nats.errors.BadSubjectError(f"invalid subject for a publish: {subject!r}")
        if len(_GOOD_SUBJECTS) > 10_000:  # templates may make many; stay bounded
            _GOOD_SUBJECTS.clear()
        _GOOD_SUBJECTS.add(subject)
    head = subject.encode() + (b" " + reply.encode() if reply else b"")
    if not headers:
        return b"PUB %b %d\r\n%b\r\n" % (head, len(payload), payload)
    lines = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        # Refuse what would not arrive as sent, rather than alter it: receivers
        # split header lines on CRLF and strip values of ASCII whitespace.
        if key not in _GOOD_KEYS:
            if not _HEADER_KEY.fullmatch(key):
                raise nats.errors.BadHeaderError(f"header name {key[:60]!r} is not a token")
            if len(_GOOD_KEYS) > 1_000:
                _GOOD_KEYS.clear()
            _GOOD_KEYS.add(key)
        raw = value.encode()
        if raw != raw.strip() or b"\r" in raw or b"\n" in raw:
            raise nats.errors.BadHeaderError(
                f"header {key!r}: a value with a line break or leading/trailing whitespace "
                "cannot travel unchanged")
        lines.append(b"%b: %b\r\n" % (key.encode(), raw))
    lines.append(b"\r\n")
    hdr = b"".join(lines)
    return b"HPUB %b %d %d\r\n%b%b\r\n" % (head, len(hdr), len(hdr) + len(payload), hdr,
                                            payload)


DirectHandler = Callable[[str, str, bytes, "dict[str, str] | None"], None]
"""Receives (subject, reply, data, headers) straight from the read loop."""


class Client(NATS):
    """nats-py's client with one repair and a few fast paths.

    nats-py (2.16) cancels the PONG waiter of a ``flush()`` that timed out but
    leaves it queued; the late PONG then raises InvalidStateError and kills the
    read loop while the client still says it is connected, and every later
    flush writes into the dead socket without a round trip, so lost batches
    look written. A PONG answers the oldest PING whether or not anyone still
    waits for it: consume it either way.
    """

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectHandler] = {}

    async def subscribe_direct(self, subject: str, handler: DirectHandler,
                               queue: str = "") -> Subscription:
        """Deliver this subscription's messages to ``handler`` from the read loop.

        No ``Msg`` object, no per-subscription queue and task, no callback
        coroutine per message: what the sources and the PubAck inbox need is the
        four parts. ``handler`` must be quick and must not block; the caller bounds
        what it buffers (nats-py's pending limits do not apply here).
        """
        sub = await self.subscribe(subject, queue=queue)
        self._direct[sub._id] = handler
        return sub

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        handler = self._direct.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        parsed = await self._process_headers(headers) if headers else None
        handler(subject.decode(), reply.decode(), data, parsed)

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def publish_replies(self, subjects: list[str], payload: bytes) -> None:
        """Publish one small payload to many subjects in one buffer append.

        For JetStream acks: the subjects are ``$JS.ACK...`` reply subjects the
        server gave us, so the per-call subject checks of ``publish()`` and its
        flush bookkeeping, which cost more than the ack itself, are skipped.
        Buffered like any publish while reconnecting.
        """
        if not subjects:
            return
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        tail = b" %d\r\n%s\r\n" % (len(payload), payload)
        command = b"".join([b"PUB " + s.encode() + tail for s in subjects])
        self.stats["out_msgs"] += len(subjects)
        self.stats["out_bytes"] += len(payload) * len(subjects)
        await self._send_command(command)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    # Set by open_connection when TLS is configured (a tls block or a tls:// URL).
    require_tls = False

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False
                            ) -> None:
        """Never plain text when TLS is configured.

        nats-py upgrades to TLS only when the server's INFO says
        ``tls_required``; otherwise it sends CONNECT, credentials included, in
        plain text even with a TLS context and a ``tls://`` URL. Here a server
        that offers TLS (``tls_available``) is upgraded anyway, and one that does
        not offer it is refused before anything is sent.
        """
        if (initial_connection and self.require_tls and not info.get("tls_required")
                and not self.options.get("tls_handshake_first")):
            if not info.get("tls_available"):
                raise nats.errors.Error(
                    "nats: TLS is configured but the server does not offer TLS; refusing "
                    "to connect in plain text")
            info["tls_required"] = True  # nats-py reads this very dict next: upgrade
        await super()._process_info(info, initial_connection)

    async def send_encoded(self, commands: list[bytes], messages: int, nbytes: int) -> None:
        """Hand commands made by :func:`encode_publish` to the connection, about a
        MiB at a time: one buffer append per chunk instead of one publish() per
        message. Buffered while reconnecting, within the pending limit, as
        publish() is."""
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        size = sum(len(c) for c in commands)
        if not self.is_connected and (
            self._max_pending_size <= 0
            or size + self._pending_data_size > self._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        start, taken = 0, 0
        for i, command in enumerate(commands):
            taken += len(command)
            if taken >= _CHUNK:
                await self._send_command(b"".join(commands[start:i + 1]))
                start, taken = i + 1, 0
        if start < len(commands):
            await self._send_command(b"".join(commands[start:]))
        self.stats["out_msgs"] += messages
        self.stats["out_bytes"] += nbytes
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        """PING queued behind the data not yet written, never ahead of it.

        nats-py writes a PING straight to the transport while earlier publishes may
        still wait in its pending buffer (the flusher is stuck in ``drain()`` while
        the socket is backed up, as after a stall). The server then answers PONG
        before it has those publishes, ``flush()`` confirms a batch the server does
        not have, and a connection lost just then loses it although it was
        acknowledged at the source. Queued in order, the PONG means what a flush
        promises: everything written before it has arrived.
        """
        if future is None:
            future = asyncio.Future()
        self._pongs.append(future)
        self._pending.append(_PING)
        self._pending_data_size += len(_PING)
        await self._flush_pending()

    async def _process_connect_init(self) -> None:
        """On every (re)connect nats-py forgets the PONGs it waited for; a PING of
        ours still queued would then be sent on the new connection and its PONG
        taken for a later flush's. Drop them with their forgotten futures."""
        await super()._process_connect_init()
        if any(c is _PING for c in self._pending):
            self._pending = [c for c in self._pending if c is not _PING]
            self._pending_data_size = sum(len(c) for c in self._pending)

    async def _process_pong(self) -> None:
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0


def _tls_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    if tls.cert_file or tls.key_file:
        if not (tls.cert_file and tls.key_file):
            raise ConnectorError("tls: cert_file and key_file go together")
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


async def open_connection(
    config: NatsConnectionConfig,
    context: PluginContext,
    reconnected: Callable[[], Awaitable[None]] | None = None,
    disconnected: Callable[[], None] | None = None,
) -> Client:
    """Connect with the shared options; connection events go to the logs and meters.

    ``reconnected`` runs after each reconnect (pull consumers re-issue requests);
    ``disconnected`` when a live connection is lost (replies sent to it are gone).
    """
    log, meters = context.logger, context.meters

    causes: list[Exception] = []  # what went wrong while first connecting
    # A certificate we rejected: retrying cannot help, and nats-py (2.16) then hangs
    # closing the socket it tried to upgrade, so the first connect stops waiting.
    rejected_certificate = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            meters.dropped(1, "nats slow consumer: client pending limit exceeded")
            return
        if not nc.is_connected:
            causes.append(exc)
            if isinstance(exc, ssl.SSLCertVerificationError | ssl.CertificateError):
                rejected_certificate.set()
            return  # the connect failure below says it once, with the address
        log.warning("nats: %s", exc or type(exc).__name__)

    async def on_disconnect() -> None:
        if nc.is_closed:
            return  # our own close
        meters.disconnected()
        log.warning("nats: disconnected; reconnecting")
        if disconnected is not None:
            disconnected()

    async def on_reconnect() -> None:
        meters.reconnected()
        log.info("nats: reconnected")
        if reconnected is not None:
            await reconnected()

    def secret(value: SecretStr | None) -> str | None:
        """An empty value (``${VAR:-}``) means unset."""
        return value.get_secret_value() or None if value is not None else None

    kwargs: dict[str, object] = {}
    if config.user:
        kwargs["user"] = config.user
    if password := secret(config.password):
        kwargs["password"] = password
    if token := secret(config.token):
        kwargs["token"] = token
    if seed := secret(config.nkey_seed):
        kwargs["nkeys_seed_str"] = seed
    if config.creds_file:
        kwargs["user_credentials"] = config.creds_file
    if config.tls is not None:
        kwargs["tls"] = _tls_context(config.tls)
        if config.tls.hostname:
            kwargs["tls_hostname"] = config.tls.hostname
        kwargs["tls_handshake_first"] = config.tls.handshake_first
    nc = Client()
    nc.require_tls = config.tls is not None or any(
        urlsplit(url).scheme == "tls" for url in config.servers)
    connecting = asyncio.ensure_future(nc.connect(
            servers=config.servers,
            name=config.name or f"natsconn:{context.pipeline}:{context.role}",
            connect_timeout=config.connect_timeout,  # type: ignore[arg-type]
            reconnect_time_wait=config.reconnect_wait,  # type: ignore[arg-type]
            # The first connect tries each server twice and then fails with its cause,
            # so a wrong address or credential is a clear error and a pipeline restart,
            # not a silent loop; once connected, reconnects follow the configuration.
            max_reconnect_attempts=1,
            ping_interval=config.ping_interval,  # type: ignore[arg-type]
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            pending_size=64 * 1024 * 1024,
            **kwargs,  # type: ignore[arg-type]
        ))
    # Each server twice, each attempt: TCP connect, INFO, TLS handshake, PONG.
    budget = len(config.servers) * 2 * (4 * config.connect_timeout + config.reconnect_wait)
    rejected = asyncio.ensure_future(rejected_certificate.wait())
    try:
        await asyncio.wait({connecting, rejected}, timeout=budget,
                           return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():  # give nats-py a moment to report for itself
            await asyncio.wait({connecting}, timeout=1.0)
    finally:
        rejected.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
    failure = (connecting.exception() if not connecting.cancelled()
               else TimeoutError(f"no connection within {budget:g}s"))
    if failure is not None:
        cause = _telling(causes) or failure
        reason = str(cause) or type(cause).__name__
        if isinstance(cause, ssl.SSLError | ssl.CertificateError):
            reason = f"TLS: {reason}"
        elif isinstance(cause, ConnectionError) and not isinstance(
            cause, ConnectionRefusedError) and (
            config.tls is not None or any(u.startswith("tls://") for u in config.servers)
        ):
            # TLS 1.3 servers check the client certificate after the handshake; the
            # refusal often reaches us as a bare reset or broken pipe, not as the alert.
            reason = (f"TLS: the server ended the session ({reason}); a missing or "
                      "untrusted client certificate shows this way with TLS 1.3")
        if config.creds_file and _is_authorization(cause):
            reason += creds_hint(config.creds_file)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)
        raise RetryableError(f"cannot connect to NATS at {describe_servers(config.servers)}: "
                             f"{reason}")
    nc.options["max_reconnect_attempts"] = config.max_reconnect_attempts
    return nc


def _is_authorization(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "Authorization" in str(exc)


def _telling(causes: list[Exception]) -> Exception | None:
    """The cause worth reporting: an authorization or TLS failure rather than the
    connection reset that follows it, else the last one."""
    for exc in reversed(causes):
        if isinstance(exc, ssl.SSLError | ssl.CertificateError) or _is_authorization(exc):
            return exc
    return causes[-1] if causes else None


_PUBLIC_NKEY = re.compile(r"^[AU][A-Z2-7]{55}$")


def creds_hint(path: str) -> str:
    """Why a server in operator mode refused a creds file, as far as the file tells.

    The server says only "Authorization Violation". The user JWT says when it
    expires (``exp``) or becomes valid (``nbf``), which user it is and which
    account issued it; a revocation is in the account JWT on the server, so it
    is named as the likely cause when the JWT itself is in date. Only public keys
    and times are printed: never the seed, nor the JWT.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        lines = [ln.strip() for ln in text.splitlines()]
        token = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if not isinstance(claims, dict):
            raise ValueError
    except Exception:
        return f" (creds file {path}: no readable user JWT in it)"

    def stamp(value: object) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(value)))  # type: ignore[arg-type]

    who = ""
    user, account = claims.get("sub"), claims.get("iss")
    if isinstance(user, str) and _PUBLIC_NKEY.match(user):
        who = f" of user {user}"
        if isinstance(account, str) and _PUBLIC_NKEY.match(account):
            who += f" (account {account})"
    now = time.time()
    expires, not_before = claims.get("exp"), claims.get("nbf")
    if isinstance(expires, int | float) and expires and expires < now:
        return (f"; the user JWT{who} in creds file {path} expired at {stamp(expires)}, "
                f"{now - expires:.0f}s ago: issue new credentials")
    if isinstance(not_before, int | float) and not_before > now:
        return (f"; the user JWT{who} in creds file {path} is not valid before "
                f"{stamp(not_before)}")
    issued = claims.get("iat")
    when = f", issued {stamp(issued)}" if isinstance(issued, int | float) else ""
    return (f"; the server refused the user JWT{who} in creds file {path}{when}, which is "
            "in date: it is most likely revoked by its account, or the server does not "
            "know or trust its account")


def describe_servers(servers: list[str]) -> str:
    """The server URLs for messages, without user, password or token."""
    out = []
    for url in servers:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        netloc = parts.netloc.rpartition("@")[2]
        out.append(f"{parts.scheme}://{netloc}")
    return ", ".join(out)


def nats_error(exc: BaseException) -> RetryableError:
    """A client error during a write, as the engine's retryable kind."""
    return RetryableError(f"nats: {exc or type(exc).__name__}")
