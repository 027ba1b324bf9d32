"""A batch read from a source, and the handle that acknowledges it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ._message import Message


class AckHandle(Protocol):
    """What a source hands back with each batch.

    The engine calls exactly one of ``ack``, ``nack`` or ``term`` per batch,
    once every message of the batch has been written durably or dead-lettered
    (``ack``), could not be (``nack``: redeliver after ``delay`` seconds), or
    must never be redelivered though it was not written (``term``).
    ``in_progress`` may be called many times while a long write is under way,
    so that sources with an ack deadline (JetStream ``ack_wait``) extend it.
    """

    async def ack(self) -> None: ...

    async def nack(self, delay: float | None = None) -> None: ...

    async def term(self, reason: str) -> None: ...

    async def in_progress(self) -> None: ...


class NoAck:
    """The ack handle of sources that cannot acknowledge (core NATS, pub/sub)."""

    async def ack(self) -> None:
        return None

    async def nack(self, delay: float | None = None) -> None:
        return None

    async def term(self, reason: str) -> None:
        return None

    async def in_progress(self) -> None:
        return None


NO_ACK = NoAck()


class CallbackAck:
    """An ack handle made of plain coroutines; unset ones do nothing."""

    __slots__ = ("_ack", "_nack", "_progress", "_term")

    def __init__(
        self,
        ack: Callable[[], Awaitable[None]] | None = None,
        nack: Callable[[float | None], Awaitable[None]] | None = None,
        term: Callable[[str], Awaitable[None]] | None = None,
        in_progress: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._ack = ack
        self._nack = nack
        self._term = term
        self._progress = in_progress

    async def ack(self) -> None:
        if self._ack is not None:
            await self._ack()

    async def nack(self, delay: float | None = None) -> None:
        if self._nack is not None:
            await self._nack(delay)

    async def term(self, reason: str) -> None:
        if self._term is not None:
            await self._term(reason)

    async def in_progress(self) -> None:
        if self._progress is not None:
            await self._progress()


@dataclass(slots=True)
class Batch:
    """Messages read together, acknowledged together."""

    messages: list[Message]
    ack: AckHandle = NO_ACK

    def __len__(self) -> int:
        return len(self.messages)
