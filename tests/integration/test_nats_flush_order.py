"""A flush confirms only what the server has: its PING goes out behind every
publish written before it, even when the socket is backed up.

nats-py writes a flush's PING straight to the transport while earlier
publishes can still wait in its pending buffer (its flusher is stuck in
``drain()``); the server then answers PONG before it has them, and a
connection lost at that moment loses a batch the sink reported as written. The
plugins' Client queues the PING behind them. A relay between the client and
the real server records the bytes in the order the server gets them.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from natsconn_nats.connection import Client

pytestmark = pytest.mark.integration


class _RecordingRelay:
    """Client -> server bytes recorded in order; reading from the client can be
    paused, so that its socket backs up."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.sent = bytearray()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                await self.flowing.wait()
                self.sent += data
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        for coro in (client_to_server(), server_to_client()):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            self._server.close()


async def test_flush_ping_follows_the_publishes_before_it(
        nats_address: tuple[str, int], unique: str) -> None:
    relay = _RecordingRelay(*nats_address)
    url = await relay.start()
    client = Client()
    await client.connect(servers=[url], pending_size=256 * 1024 * 1024,
                         allow_reconnect=False, ping_interval=600)
    try:
        await client.flush(timeout=10)
        relay.flowing.clear()  # the relay stops reading: the client's socket backs up
        filler = b"x" * 60_000
        for _ in range(600):  # 36 MB: far more than the socket and transport buffers
            await client.publish(f"order.{unique}.fill", filler)
        await asyncio.sleep(0.5)  # the flusher hands it over and blocks in drain()
        for i in range(100):
            await client.publish(f"order.{unique}.check", b"%d" % i)
        flush = asyncio.ensure_future(client.flush(timeout=60))
        await asyncio.sleep(0.2)
        relay.flowing.set()
        await flush
    finally:
        await client.close()
        await relay.close()
    stream = bytes(relay.sent)
    last_check = stream.rfind(f"PUB order.{unique}.check ".encode())
    last_ping = stream.rfind(b"PING\r\n")
    assert last_check > 0 and last_ping > 0
    assert last_ping > last_check, (
        "the flush's PING went out ahead of publishes written before it: its PONG "
        "would confirm messages the server did not have yet")
