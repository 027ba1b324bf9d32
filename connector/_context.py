"""What the host gives each plugin instance: its name, a logger, and a few meters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol


class Meters(Protocol):
    """The figures a plugin reports that the engine cannot see by itself."""

    def dropped(self, count: int, reason: str) -> None:
        """Messages lost before natsconn could hold them (core NATS slow consumer,
        pub/sub overflow). Counted and logged; never silent."""

    def filtered(self, count: int) -> None:
        """Messages a transform dropped on purpose (a filter said no). They are
        acknowledged at the source with the rest of their batch, and counted."""

    def reconnected(self) -> None:
        """The plugin's connection came back after a loss."""

    def disconnected(self) -> None:
        """The plugin's connection was lost."""

    def lag(self, messages: int) -> None:
        """How many messages wait at the source (JetStream pending, Kafka lag)."""

    def lag_bytes(self, nbytes: int) -> None:
        """How many bytes wait at the source, where it counts in bytes (the WAL a
        replication slot retains)."""


class NullMeters:
    """Meters that record nothing, for tests and tools."""

    def dropped(self, count: int, reason: str) -> None:
        return None

    def filtered(self, count: int) -> None:
        return None

    def reconnected(self) -> None:
        return None

    def disconnected(self) -> None:
        return None

    def lag(self, messages: int) -> None:
        return None

    def lag_bytes(self, nbytes: int) -> None:
        return None


@dataclass(slots=True)
class PluginContext:
    """Per-instance context. ``role`` is ``source``, ``sink``, ``dead_letter`` or
    ``transform``; ``instance`` names this process's replica (host or pod name),
    used by sources whose consumers need a per-replica name."""

    pipeline: str = "test"
    role: str = "test"
    instance: str = "natsconn"
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("natsconn.plugin"))
    meters: Meters = field(default_factory=NullMeters)
