"""A real HTTP endpoint on loopback that records what the webhook sink posts.

It can be told to answer with a given status for the next requests, so the
tests can show retries and rejections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from natsconn_webhook.sink import decode

from connector import Message


class Receiver:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.requests = 0
        self.fail_with: list[int] = []  # statuses to answer, one per request, before 200
        self.arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests += 1
                status = self.fail_with.pop(0) if self.fail_with else 200
                if status == 200:
                    items: list[dict[str, Any]] = json.loads(body)
                    self.messages.extend(decode(item) for item in items)
                    self.arrived.set()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def wait_for(self, count: int, timeout: float) -> list[Message]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return list(self.messages)
