"""A TCP proxy for fault injection: put it between a plugin and its server.

The plugin connects to ``proxy.address``; the proxy forwards every byte to the
real server. A test then breaks the path on demand:

* ``cut()`` aborts every live connection in both directions, as a network
  failure or a server crash would. New connections are still accepted (the
  client's reconnect succeeds) unless ``refuse(True)`` was called.
* ``stall()`` keeps the connections open but stops forwarding bytes (a hung
  server, a black-holed route); ``resume()`` forwards again, nothing lost.
* ``delay`` (seconds, settable at any time) holds back every chunk: the chunks
  of a connection wait one after another, so it also paces the flow.
* ``corrupt(chunks, up=False)`` garbles the next ``chunks`` chunks going to the
  client (or, with ``up=True``, to the server): a run of bytes in the middle of
  each is inverted, as a broken middlebox or a bad NIC would leave them.
* ``latency`` and ``jitter`` (seconds, settable at any time) delay each chunk
  by ``latency`` ± up to ``jitter``, pipelined as a slow link would: chunks in
  flight overlap, and their order is kept (a later chunk never overtakes).

``record_up``, set to a ``bytearray``, collects every byte forwarded to the
server, in the order the server gets it (for tests of what a client sends).

The technique follows asyncpg's test proxy; this implementation is our own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from types import TracebackType

_CHUNK = 64 * 1024
_IN_FLIGHT = 256  # chunks held under ``latency`` before reading waits


class _Link:
    """One client connection and its connection to the server."""

    __slots__ = ("client", "server", "tasks")

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards ``127.0.0.1:<random port>`` to ``target_host:target_port``.

    ``listen_port`` fixes the port instead (a server that advertises the proxy's
    address to its clients, as a Kafka listener does, needs it known in advance).

    Use ``await TcpProxy(host, port).start()`` (or ``async with``); ``close()``
    stops listening and aborts every connection.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay: float = 0.0,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.delay = delay
        self.latency = 0.0
        self.jitter = 0.0
        self.corrupted = 0  # chunks garbled by corrupt(), over the proxy's life
        self._corrupt = {True: 0, False: 0}  # chunks still to garble, by direction (up?)
        self.accepted = 0  # connections accepted and forwarded, over the proxy's life
        self.refused = 0  # connections closed at once because of refuse()
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.record_up: bytearray | None = None  # set one to record client -> server
        self._server: asyncio.Server | None = None
        self._port = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> TcpProxy:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self.listen_host,
                                                      self.listen_port)
            self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and abort every connection. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.cut()
        self._flowing.set()
        handlers = list(self._handlers)
        if handlers:  # they end by themselves once their links are cut
            _, stuck = await asyncio.wait(handlers, timeout=5.0)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ address

    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def port(self) -> int:
        if self._server is None and self._port == 0:
            raise RuntimeError("TcpProxy is not started; await proxy.start() first")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to give the client instead of the server's address."""
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._links)

    # ------------------------------------------------------------------ faults

    def cut(self) -> None:
        """Abort every live connection, both ways. Later connections are accepted
        unless :meth:`refuse` is on."""
        links = list(self._links)
        self._links.clear()
        for link in links:
            link.abort()

    def refuse(self, on: bool = True) -> None:
        """While on, new connections are closed as soon as they are accepted."""
        self._refusing = on

    def corrupt(self, chunks: int = 1, *, up: bool = False) -> None:
        """Garble the next ``chunks`` chunks forwarded to the client (``up``: to the
        server): 16 bytes from the middle of each (all of a shorter one) inverted."""
        self._corrupt[up] += chunks

    def _garble(self, data: bytes, up: bool) -> bytes:
        if not self._corrupt[up]:
            return data
        self._corrupt[up] -= 1
        self.corrupted += 1
        start = max(0, len(data) // 2 - 8)
        end = min(len(data), start + 16)
        return data[:start] + bytes(b ^ 0xFF for b in data[start:end]) + data[end:]

    def stall(self) -> None:
        """Stop forwarding bytes; connections stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again after :meth:`stall`, held bytes first."""
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    # ------------------------------------------------------------------ forwarding

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # asyncio (3.11) logs an error for a client_connected_cb task that
            # ends cancelled; being cancelled is how a handler ends at close.
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing or self._server is None:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, up=True)),
            asyncio.create_task(self._pump(up_reader, writer, up=False)),
        ]
        try:
            # When either direction ends, the whole link goes: a half-open
            # connection is not a state the clients under test expect.
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            link.abort()
            await asyncio.gather(*link.tasks, return_exceptions=True)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        line = _Line(self, writer, up)
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    data = await reader.read(_CHUNK)
                    if not data:
                        break
                    await self._flowing.wait()
                    if self.delay > 0:
                        await asyncio.sleep(self.delay)
                        await self._flowing.wait()
                    if writer.transport.is_closing():
                        break
                    data = self._garble(data, up)
                    if line.busy or self.latency > 0 or self.jitter > 0:
                        await line.later(data)
                    else:
                        await line.write(data)
            await line.drained()  # what is in flight still arrives, then the link goes
        finally:
            line.cancel()  # a cut (the link's tasks cancelled) drops what was in flight

    def _forwarded(self, data: bytes, up: bool) -> None:
        if up:
            self.bytes_up += len(data)
            if self.record_up is not None:
                self.record_up += data
        else:
            self.bytes_down += len(data)


class _Line:
    """One direction of a link, with its chunks in flight under ``latency``."""

    __slots__ = ("last_due", "proxy", "queue", "room", "task", "up", "writer")

    def __init__(self, proxy: TcpProxy, writer: asyncio.StreamWriter, up: bool) -> None:
        self.proxy = proxy
        self.writer = writer
        self.up = up
        self.queue: deque[tuple[float, bytes]] = deque()
        self.last_due = 0.0
        self.task: asyncio.Task[None] | None = None
        self.room = asyncio.Event()
        self.room.set()

    @property
    def busy(self) -> bool:
        return bool(self.queue)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.proxy._forwarded(data, self.up)
        await self.writer.drain()

    async def later(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        p = self.proxy
        due = loop.time() + p.latency + (random.uniform(-p.jitter, p.jitter) if p.jitter else 0)
        self.last_due = max(due, self.last_due)  # order kept: never before the one ahead
        self.queue.append((self.last_due, data))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._deliver())
        if len(self.queue) >= _IN_FLIGHT:  # back-pressure, as a full link would
            self.room.clear()
            await self.room.wait()

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionError, OSError):
            while self.queue:
                due, data = self.queue[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.proxy._flowing.wait()
                if self.writer.transport.is_closing():
                    break
                await self.write(data)
                self.queue.popleft()
                if len(self.queue) < _IN_FLIGHT:
                    self.room.set()
        self.queue.clear()
        self.room.set()

    async def drained(self) -> None:
        task = self.task
        if task is not None:
            await task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
