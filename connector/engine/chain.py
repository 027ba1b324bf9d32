"""A list of transforms applied in order: messages in, messages and poison out.

A transform's ``process`` may be a plain method or a coroutine (one that looks
schemas up in a registry, or stores payloads in an object store); ``connect``
and ``close`` hooks are called with the pipeline's.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from .._message import Message
from .._plugin import Rejected, Transform


class TransformChain:
    __slots__ = ("transforms",)

    def __init__(self, transforms: Sequence[Transform[Any]]) -> None:
        self.transforms = list(transforms)

    def __bool__(self) -> bool:
        return bool(self.transforms)

    async def connect(self) -> None:
        for t in self.transforms:
            await t.connect()

    async def close(self) -> None:
        for t in self.transforms:
            await t.close()

    async def apply(self, messages: list[Message]) -> tuple[list[Message], list[Rejected]]:
        rejected: list[Rejected] = []
        for transform in self.transforms:
            out: Any = transform.process(messages)
            if inspect.isawaitable(out):
                out = await out
            messages = []
            for item in out:
                if isinstance(item, Message):
                    messages.append(item)
                else:
                    rejected.append(item)
            if not messages:
                break
        return messages, rejected
