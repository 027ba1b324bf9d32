"""The ``postgres_notify`` source: LISTEN on channels; payload → data, channel → subject.

At most once, by nature: PostgreSQL hands a notification to the sessions
listening at that moment and keeps nothing. Notifications sent while natsconn
is down or reconnecting are lost, and so are those still buffered in the
process when it crashes. Beyond ``max_buffered`` unread notifications the
newest are dropped and counted in ``natsconn_dropped_total``. Use the outbox
source when every event matters.
"""

from __future__ import annotations

import base64
import binascii
import time
from enum import StrEnum

from pydantic import Field

from connector import Batch, Duration, Message, PushBuffer, Source

from .connection import PostgresConnectionConfig
from .listener import Listener


class PayloadFormat(StrEnum):
    text = "text"
    base64 = "base64"


class NotifySourceConfig(PostgresConnectionConfig):
    channels: list[str] = Field(min_length=1, description="channels to LISTEN on "
                                "(names as written, case-sensitive)")
    max_buffered: int = Field(100_000, ge=1, description="notifications held for the "
                              "pipeline; beyond it they are dropped and counted")
    payload_format: PayloadFormat = Field(
        PayloadFormat.text, description="text: the payload's UTF-8 bytes are the data; "
        "base64: the notifier sent base64 (binary data); undecodable payloads are dropped "
        "and counted")
    keepalive_interval: Duration = Field(
        10.0, gt=0, description="how often the LISTEN connection is checked with SELECT 1")


class NotifySource(Source[NotifySourceConfig]):
    """PostgreSQL LISTEN/NOTIFY (at most once: notifications sent while away are lost)."""

    Config = NotifySourceConfig

    async def connect(self) -> None:
        cfg = self.config
        self._buffer: PushBuffer[Message] = PushBuffer(cfg.max_buffered)
        self._base64 = cfg.payload_format is PayloadFormat.base64
        self._listener = Listener(cfg, self.context, cfg.channels, self._on_notify,
                                  keepalive=cfg.keepalive_interval)
        await self._listener.start()

    def _on_notify(self, channel: str, payload: str) -> None:
        if self._buffer.full():
            self.context.meters.dropped(1, "postgres_notify buffer full (max_buffered)")
            return
        if self._base64:
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                self.context.meters.dropped(1, f"postgres_notify: payload on {channel!r} is "
                                               "not base64")
                return
        else:
            data = payload.encode()
        self._buffer.push(Message(data, channel, None, {}, time.time(), None))

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        messages = await self._buffer.take(max_messages, max_wait)
        return Batch(messages) if messages else None

    async def close(self) -> None:
        listener = getattr(self, "_listener", None)
        if listener is None:
            return
        await listener.close()
        left = len(self._buffer)
        if left:
            self.context.meters.dropped(left, "received but unread at close (LISTEN)")
