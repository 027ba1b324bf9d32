"""A flush confirms only what the server has: its PING goes out behind every
publish written before it, even when the socket is backed up.

nats-py writes a flush's PING straight to the transport while earlier
publishes can still wait in its pending buffer (its flusher is stuck in
``drain()``); the server then answers PONG before it has them, and a
connection lost at that moment loses a batch the sink reported as written. The
plugins' Client queues the PING behind them. The test proxy between the client
and the real server records the bytes in the order the server gets them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from natsconn_nats.connection import Client

pytestmark = pytest.mark.integration


async def test_flush_ping_follows_the_publishes_before_it(
        nats_address: tuple[str, int], unique: str, tcp_proxy: Any) -> None:
    proxy = await tcp_proxy(*nats_address)
    client = Client()
    await client.connect(servers=[f"nats://{proxy.address}"], pending_size=256 * 1024 * 1024,
                         allow_reconnect=False, ping_interval=600)
    try:
        await client.flush(timeout=10)
        proxy.record_up = bytearray()
        proxy.stall()  # the proxy stops reading: the client's socket backs up
        filler = b"x" * 60_000
        for _ in range(600):  # 36 MB: far more than the socket and transport buffers
            await client.publish(f"order.{unique}.fill", filler)
        await asyncio.sleep(0.5)  # the flusher hands it over and blocks in drain()
        for i in range(100):
            await client.publish(f"order.{unique}.check", b"%d" % i)
        flush = asyncio.ensure_future(client.flush(timeout=60))
        await asyncio.sleep(0.2)
        proxy.resume()
        await flush
    finally:
        await client.close()
    stream = bytes(proxy.record_up)
    last_check = stream.rfind(f"PUB order.{unique}.check ".encode())
    last_ping = stream.rfind(b"PING\r\n")
    assert last_check > 0 and last_ping > 0
    assert last_ping > last_check, (
        "the flush's PING went out ahead of publishes written before it: its PONG "
        "would confirm messages the server did not have yet")
