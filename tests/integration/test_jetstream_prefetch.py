"""Prefetched JetStream messages that wait in the source's buffer longer than
``ack_wait`` (the sink stalled, the engine stopped reading) are not redelivered:
the source keeps them in hand with ``+WPI``, so a stall costs no duplicates."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS
from natsconn_nats.jetstream_source import JetStreamSource

from .helpers import consumer_info, create_stream, publish_js, seq_of

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]


async def test_buffered_messages_outlive_ack_wait_without_redelivery(
        nc: NATS, nats_url: str, unique: str) -> None:
    n, ack_wait = 500, 1.0
    stream, durable = f"PREFETCH_{unique}", f"prefetch-{unique}"
    await create_stream(nc, stream, [f"prefetch.{unique}.>"])
    await publish_js(nc, f"prefetch.{unique}.x", n)
    source = JetStreamSource.make_test_instance(
        servers=[nats_url], stream=stream, durable=durable, ack_wait=f"{ack_wait}s",
        prefetch=n)
    await source.connect()
    seen: list[int] = []
    try:
        # A read returns what the buffer holds when it looks, which may be
        # fewer than asked for while the window is still arriving.
        first = await source.read_batch(10, 5.0)
        assert first is not None
        seen += [seq_of(m.data) for m in first.messages]
        await first.ack.ack()
        # The rest of the window sits in the buffer for 3.5 x ack_wait, unread.
        await asyncio.sleep(3.5 * ack_wait)
        info = await consumer_info(nc, stream, durable)
        assert info.num_redelivered == 0, "buffered messages were redelivered"
        assert info.num_ack_pending == n - len(seen), info
        while len(seen) < n:
            batch = await source.read_batch(100, 5.0)
            assert batch is not None, f"only {len(seen)} of {n} arrived"
            seen += [seq_of(m.data) for m in batch.messages]
            await batch.ack.ack()
        # Anything the server had redelivered would come now.
        extra = await source.read_batch(100, 2 * ack_wait)
        assert extra is None, f"{len(extra.messages)} redelivered message(s) arrived"
    finally:
        await source.close()
    assert sorted(seen) == list(range(n))
    info = await consumer_info(nc, stream, durable)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0, info
