"""The message that flows through every pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

_EMPTY: Mapping[str, str] = {}


@dataclass(slots=True, weakref_slot=True)
class Message:
    """One message on its way from a source to a sink.

    ``subject`` is the address on the far side (NATS subject, Kafka topic,
    Redis stream/channel/key, table name). ``id`` is a stable identity given by
    the source (JetStream ``stream:seq``, Kafka ``topic/partition/offset``, …);
    sinks that can deduplicate use it (JetStream ``Nats-Msg-Id``, upsert keys).
    ``timestamp`` is seconds since the epoch, as the source saw it.
    """

    data: bytes
    subject: str | None = None
    key: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    timestamp: float | None = None
    id: str | None = None

    def with_headers(self, extra: Mapping[str, str]) -> Message:
        """A copy with ``extra`` merged over the current headers."""
        merged = dict(self.headers)
        merged.update(extra)
        return Message(self.data, self.subject, self.key, merged, self.timestamp, self.id)
