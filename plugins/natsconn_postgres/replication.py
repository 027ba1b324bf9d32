"""A logical replication connection, speaking PostgreSQL's wire protocol directly.

asyncpg has no replication protocol and psycopg's is synchronous (psycopg2)
or absent (psycopg 3), so the ``postgres_cdc`` source talks to the walsender
itself over an asyncio stream: startup with ``replication=database``,
authentication (trust, cleartext, MD5, SCRAM-SHA-256), TLS through the same
:func:`ssl_context` as the other plugins, simple queries
(``CREATE_REPLICATION_SLOT``), then ``START_REPLICATION ... LOGICAL`` and the
CopyBoth stream: ``XLogData`` (``w``) and keepalive (``k``) frames in,
standby status updates (``r``) out.

Reading is pull: :meth:`ReplicationConnection.read_frames` is awaited only when
the source wants more, the stream reader's buffer is bounded (``limit``), and
when it is full the transport stops reading: TCP holds the walsender back.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import hashlib
import hmac
import os
import secrets
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from .connection import PostgresConnectionConfig, ssl_context
from .pgoutput import PG_EPOCH

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_STATUS = struct.Struct("!cQQQqB")  # 'r', written, flushed, applied, clock, reply
_XLOG_HEAD = struct.Struct("!QQq")  # start, end, clock
_KEEPALIVE = struct.Struct("!Qq?")  # end, clock, reply requested


class PgError(Exception):
    """An ErrorResponse from the server."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields
        self.sqlstate = fields.get("C", "")
        self.severity = fields.get("S", "ERROR")
        self.message = fields.get("M", "unknown error")
        text = f"{self.sqlstate}: {self.message}"
        if fields.get("D"):
            text += f" DETAIL: {fields['D']}"
        if fields.get("H"):
            text += f" HINT: {fields['H']}"
        super().__init__(text)


class ProtocolError(Exception):
    """The server said something this client does not expect."""


@dataclass(slots=True)
class Target:
    host: str
    port: int
    user: str
    password: str | None
    database: str


def target_of(cfg: PostgresConnectionConfig) -> Target:
    """Host, port, user, password and database from the options and the DSN,
    resolved as the other plugins resolve them (fields override the DSN)."""
    host = port = user = password = database = None
    if cfg.dsn is not None:
        parts = urlsplit(cfg.dsn.get_secret_value())
        if parts.netloc and "," in parts.netloc:
            raise ProtocolError("a DSN with several hosts is not supported here")
        host, port = parts.hostname, parts.port
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        database = unquote(parts.path.lstrip("/")) or None
    host = cfg.host or host or "127.0.0.1"
    port = cfg.port or port or 5432
    user = cfg.user or user or os.environ.get("PGUSER") or getpass.getuser()
    if cfg.password is not None:
        password = cfg.password.get_secret_value()
    if password is None:
        password = os.environ.get("PGPASSWORD")
    database = cfg.database or database or user
    return Target(host, port, user, password, database)


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _error_fields(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


class ReplicationConnection:
    """One walsender session. Not safe for concurrent readers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 parameters: dict[str, str]) -> None:
        self._reader = reader
        self._writer = writer
        self.parameters = parameters
        self.server_pid = 0
        self.streaming = False
        self._buf = bytearray()
        self._pos = 0
        self._read_task: asyncio.Future[bytes] | None = None
        self.closed = False

    # -- opening

    @classmethod
    async def open(cls, cfg: PostgresConnectionConfig, settings: dict[str, str], *,
                   limit: int = 1 << 20) -> ReplicationConnection:
        target = target_of(cfg)
        ctx = ssl_context(cfg)
        if target.host.startswith("/"):
            reader, writer = await asyncio.open_unix_connection(
                f"{target.host}/.s.PGSQL.{target.port}", limit=limit)
        else:
            reader, writer = await asyncio.open_connection(target.host, target.port,
                                                           limit=limit)
        try:
            if isinstance(ctx, ssl.SSLContext):
                writer.write(_SSL_REQUEST)
                await writer.drain()
                answer = await reader.readexactly(1)
                if answer != b"S":
                    raise ProtocolError("the server does not accept SSL connections "
                                        "(ssl mode requires it)")
                await writer.start_tls(ctx, server_hostname=target.host)
            params = {"user": target.user, "database": target.database,
                      "replication": "database", "client_encoding": "UTF8", **settings}
            body = struct.pack("!i", 196608) + b"".join(
                k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
            writer.write(struct.pack("!i", len(body) + 4) + body)
            conn = cls(reader, writer, {})
            await conn._authenticate(target)
            return conn
        except BaseException:
            writer.close()
            raise

    async def _read_message(self) -> tuple[bytes, bytes]:
        head = await self._reader.readexactly(5)
        (n,) = struct.unpack_from("!i", head, 1)
        body = await self._reader.readexactly(n - 4) if n > 4 else b""
        return head[:1], body

    async def _authenticate(self, target: Target) -> None:
        scram: _Scram | None = None
        while True:
            kind, body = await self._read_message()
            if kind == b"E":
                raise PgError(_error_fields(body))
            if kind == b"R":
                (code,) = struct.unpack_from("!i", body)
                if code == 0:
                    continue
                if code in (3, 5, 10) and target.password is None:
                    raise ProtocolError(f"the server asks for a password for user "
                                        f"{target.user!r} and none is configured")
                password = target.password or ""
                if code == 3:
                    self._send(b"p", password.encode() + b"\0")
                elif code == 5:
                    salt = body[4:8]
                    inner = hashlib.md5((password + target.user).encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + salt).hexdigest()
                    self._send(b"p", b"md5" + outer.encode() + b"\0")
                elif code == 10:
                    mechanisms = [m.decode() for m in body[4:].split(b"\0") if m]
                    if "SCRAM-SHA-256" not in mechanisms:
                        raise ProtocolError(f"no supported SASL mechanism in {mechanisms}")
                    scram = _Scram(password)
                    first = scram.first().encode()
                    self._send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first))
                               + first)
                elif code == 11 and scram is not None:
                    self._send(b"p", scram.final(body[4:].decode()).encode())
                elif code == 12 and scram is not None:
                    scram.verify(body[4:].decode())
                else:
                    raise ProtocolError(f"unsupported authentication request {code}")
                await self._writer.drain()
            elif kind == b"S":
                name, value, _ = body.split(b"\0", 2)
                self.parameters[name.decode()] = value.decode()
            elif kind == b"K":
                (self.server_pid,) = struct.unpack_from("!i", body)
            elif kind == b"Z":
                return
            elif kind == b"N":
                continue
            else:
                raise ProtocolError(f"unexpected message {kind!r} during startup")

    def _send(self, kind: bytes, body: bytes) -> None:
        self._writer.write(_msg(kind, body))

    # -- simple queries (replication commands)

    async def query(self, sql: str) -> list[dict[str, str | None]]:
        """Run one command; its rows as dicts of text values."""
        self._send(b"Q", sql.encode() + b"\0")
        await self._writer.drain()
        names: list[str] = []
        rows: list[dict[str, str | None]] = []
        error: PgError | None = None
        while True:
            kind, body = await self._read_message()
            if kind == b"T":
                (n,) = struct.unpack_from("!h", body)
                pos = 2
                names = []
                for _ in range(n):
                    end = body.index(b"\0", pos)
                    names.append(body[pos:end].decode())
                    pos = end + 1 + 18
            elif kind == b"D":
                (n,) = struct.unpack_from("!h", body)
                pos = 2
                values: list[str | None] = []
                for _ in range(n):
                    (size,) = struct.unpack_from("!i", body, pos)
                    pos += 4
                    if size < 0:
                        values.append(None)
                    else:
                        values.append(body[pos:pos + size].decode())
                        pos += size
                rows.append(dict(zip(names, values, strict=False)))
            elif kind == b"E":
                error = PgError(_error_fields(body))
            elif kind == b"Z":
                if error is not None:
                    raise error
                return rows
            elif kind == b"W":
                raise ProtocolError("the command started a copy; use start_replication")
            # C (complete), N (notice), S (parameter), I (empty): nothing to do

    async def start_replication(self, slot: str, options: dict[str, str],
                                start_lsn: str = "0/0") -> None:
        opts = ", ".join(f'"{k}" \'{v.replace(chr(39), chr(39) * 2)}\''
                         for k, v in options.items())
        sql = f'START_REPLICATION SLOT "{slot}" LOGICAL {start_lsn} ({opts})'
        self._send(b"Q", sql.encode() + b"\0")
        await self._writer.drain()
        while True:
            kind, body = await self._read_message()
            if kind == b"W":
                self.streaming = True
                return
            if kind == b"E":
                error = PgError(_error_fields(body))
                await self._skip_to_ready()
                raise error
            if kind in (b"N", b"S"):
                continue
            raise ProtocolError(f"unexpected message {kind!r} after START_REPLICATION")

    async def _skip_to_ready(self) -> None:
        while True:
            kind, _ = await self._read_message()
            if kind == b"Z":
                return

    # -- the stream

    async def read_frames(self, max_wait: float, want_bytes: int = 1 << 18
                          ) -> list[tuple[int, int, Any]]:
        """Frames already buffered, or, if none, those that arrive within
        ``max_wait``. Each is ``(kind, lsn, payload)``: ``(0x77, start, data)`` for
        XLogData, ``(0x6B, wal_end, reply_requested)`` for a keepalive.
        Raises :class:`PgError` for an ErrorResponse, ``EOFError`` at the end."""
        frames = self._parse()
        if frames or max_wait <= 0:
            return frames
        # One read in flight at a time, never cancelled on a timeout: cancelling
        # a read that has just completed would lose its bytes (asyncio.wait_for
        # before 3.12) and break the framing of everything after them.
        task = self._read_task
        if task is None:
            task = self._read_task = asyncio.ensure_future(self._reader.read(want_bytes))
        done, _ = await asyncio.wait((task,), timeout=max_wait)
        if not done:
            return []
        self._read_task = None
        chunk = task.result()
        if not chunk:
            raise EOFError("the server closed the replication connection")
        self._buf += chunk
        return self._parse()

    def _parse(self) -> list[tuple[int, int, Any]]:
        buf, pos = self._buf, self._pos
        out: list[tuple[int, int, Any]] = []
        end = len(buf)
        unpack_len = struct.unpack_from
        while end - pos >= 5:
            (n,) = unpack_len("!i", buf, pos + 1)
            if end - pos < n + 1:
                break
            kind = buf[pos]
            body_start = pos + 5
            pos += n + 1
            if kind == 0x64:  # d: CopyData
                sub = buf[body_start]
                if sub == 0x77:  # w
                    start, _wal_end, _clock = _XLOG_HEAD.unpack_from(buf, body_start + 1)
                    out.append((0x77, start, bytes(buf[body_start + 25:pos])))
                elif sub == 0x6B:  # k
                    wal_end, _clock, reply = _KEEPALIVE.unpack_from(buf, body_start + 1)
                    out.append((0x6B, wal_end, reply))
            elif kind == 0x45:  # E
                self._pos = pos
                raise PgError(_error_fields(bytes(buf[body_start:pos])))
            elif kind == 0x63:  # c: CopyDone
                self._pos = pos
                raise EOFError("the server ended the replication stream (CopyDone)")
            # N (notice), S (parameter status): ignored
        if pos > 1 << 16 and pos > len(buf) // 2:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out

    def send_status(self, lsn: int, reply: bool = False) -> None:
        """Standby status update: written = flushed = applied = ``lsn``. Only while
        streaming (before START_REPLICATION there is no copy to send it in)."""
        if not self.streaming or self.closed or self._writer.is_closing():
            return
        clock = int((time.time() - PG_EPOCH) * 1_000_000)
        self._send(b"d", _STATUS.pack(b"r", lsn, lsn, lsn, clock, reply))

    async def drain(self) -> None:
        await self._writer.drain()

    def _cancel_read(self) -> None:
        task, self._read_task = self._read_task, None
        if task is not None:
            task.cancel()

    async def close(self, timeout: float = 2.0) -> None:
        """CopyDone and Terminate, then close; bounded by ``timeout``."""
        if self.closed:
            return
        self.closed = True
        self._cancel_read()
        try:
            if not self._writer.is_closing():
                if self.streaming:
                    self._send(b"c", b"")
                self._send(b"X", b"")
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
        except (OSError, TimeoutError, ConnectionError):
            pass
        finally:
            self._writer.close()
            try:
                async with asyncio.timeout(timeout):
                    await self._writer.wait_closed()
            except (OSError, TimeoutError, ConnectionError):
                pass

    def abort(self) -> None:
        self.closed = True
        self._cancel_read()
        transport = self._writer.transport
        transport.abort()


class _Scram:
    """SCRAM-SHA-256 (RFC 7677) without channel binding, as libpq's default."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.auth_message = b""
        self.salted = b""

    def first(self) -> str:
        return "n,," + self.first_bare

    def final(self, server_first: str) -> str:
        attrs = dict(item.split("=", 1) for item in server_first.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise ProtocolError("SCRAM: the server's nonce does not extend ours")
        self.salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, iterations)
        client_key = hmac.digest(self.salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        self.auth_message = f"{self.first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(stored_key, self.auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}"

    def verify(self, server_final: str) -> None:
        attrs = dict(item.split("=", 1) for item in server_final.split(","))
        server_key = hmac.digest(self.salted, b"Server Key", "sha256")
        expected = hmac.digest(server_key, self.auth_message, "sha256")
        if base64.b64decode(attrs.get("v", "")) != expected:
            raise ProtocolError("SCRAM: the server's signature does not match")
