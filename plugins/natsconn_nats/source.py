"""The ``nats`` source: core NATS subjects, optionally in a queue group.

Core NATS holds nothing for a consumer that is away or slow: while natsconn is
down messages are lost, and when it falls behind the client's pending limits
the overflow is counted in ``natsconn_dropped_total`` and logged.
"""

from __future__ import annotations

import contextlib

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import Field

from connector import Batch, ByteSize, Message, PushBuffer, Source

from .connection import NatsConnectionConfig, open_connection


class NatsSourceConfig(NatsConnectionConfig):
    subjects: list[str] = Field(min_length=1, description="subjects, wildcards allowed")
    queue_group: str | None = Field(None, description="share the subjects among replicas")
    pending_messages_limit: int = Field(
        512 * 1024, ge=1, description="client-side buffer; beyond it messages are dropped "
        "and counted")
    pending_bytes_limit: ByteSize = Field(128 * 1024 * 1024)


class NatsSource(Source[NatsSourceConfig]):
    """Core NATS subscription (at most once; overflow counted as dropped)."""

    Config = NatsSourceConfig

    async def connect(self) -> None:
        cfg = self.config
        self._nc: NATS = await open_connection(cfg, self.context)
        self._buffer: PushBuffer[Msg] = PushBuffer()
        self._subs: list[Subscription] = []
        push = self._buffer.push

        async def on_message(msg: Msg) -> None:
            push(msg)

        for subject in cfg.subjects:
            self._subs.append(await self._nc.subscribe(
                subject, queue=cfg.queue_group or "", cb=on_message,
                pending_msgs_limit=cfg.pending_messages_limit,
                pending_bytes_limit=cfg.pending_bytes_limit,
            ))
        # nats-py writes a flush's PING straight to the socket, ahead of the SUBs
        # still queued for its flusher task: only the second round trip proves
        # that the server holds the subscriptions.
        await self._nc.flush()
        await self._nc.flush()

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        msgs = await self._buffer.take(max_messages, max_wait)
        if not msgs:
            return None
        return Batch([Message(m.data, m.subject, None, m.headers or {}) for m in msgs])

    async def close(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is None:
            return
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        left = len(self._buffer)
        if left:
            self.context.meters.dropped(left, "received but unread at close (core NATS)")
        await nc.close()
