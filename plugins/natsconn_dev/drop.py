"""The ``drop`` sink: accepts and discards, optionally after a delay."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pydantic import Field

from connector import Duration, Message, PluginConfig, Sink


class DropConfig(PluginConfig):
    delay: Duration = Field(0.0, description="simulated write latency per batch")


class DropSink(Sink[DropConfig]):
    """Discards every message (after an optional delay); for tests and benchmarks."""

    Config = DropConfig

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.written = 0

    async def write_batch(self, messages: Sequence[Message]) -> None:
        if self.config.delay:
            await asyncio.sleep(self.config.delay)
        self.written += len(messages)
