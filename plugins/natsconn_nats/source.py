"""The ``nats`` source: core NATS subjects, optionally in a queue group.

Core NATS holds nothing for a consumer that is away or slow: while natsconn is
down messages are lost, and when it falls behind the client's pending limits
the overflow is counted in ``natsconn_dropped_total`` and logged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType

from nats.aio.subscription import Subscription
from pydantic import Field

from connector import Batch, ByteSize, Message, PluginConfig, PushBuffer, Source

from .connection import Client, NatsConnectionConfig, open_connection

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


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

    @classmethod
    def shareable(cls, config: PluginConfig) -> bool:
        """With a queue group, replicas split the subjects' messages; without
        one, each would get every message."""
        return getattr(config, "queue_group", None) is not None

    async def connect(self) -> None:
        cfg = self.config
        self._nc: Client = await open_connection(cfg, self.context)
        self._buffer: PushBuffer[Message] = PushBuffer()
        self._buffered_bytes = 0
        self._subs: list[Subscription] = []
        for subject in cfg.subjects:
            self._subs.append(await self._nc.subscribe_direct(
                subject, self._on_message, queue=cfg.queue_group or ""))
        # nats-py writes a flush's PING straight to the socket, ahead of the SUBs
        # still queued for its flusher task: only the second round trip proves
        # that the server holds the subscriptions.
        await self._nc.flush()
        await self._nc.flush()

    def _on_message(self, subject: str, _reply: str, data: bytes,
                    headers: dict[str, str] | None) -> None:
        """From the read loop. Core NATS cannot hold messages back: past the
        buffer's limits they are dropped, counted and logged."""
        cfg = self.config
        if (len(self._buffer) >= cfg.pending_messages_limit
                or self._buffered_bytes + len(data) > cfg.pending_bytes_limit):
            self.context.meters.dropped(1, "core NATS buffer full (sink slower than "
                                           "publishers; pending_messages_limit/bytes)")
            return
        self._buffered_bytes += len(data)
        self._buffer.push(Message(data, subject, None, headers or _NO_HEADERS))

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        messages = await self._buffer.take(max_messages, max_wait)
        if not messages:
            return None
        self._buffered_bytes -= sum(len(m.data) for m in messages)
        return Batch(messages)

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
