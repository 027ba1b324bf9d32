"""The ``redis_list`` sink: LPUSH or RPUSH, one pipelined round trip per batch.

Messages for the same list go out as one push with many values, in batch
order, so a consumer popping from the other end sees them in order. Only the
payload travels: list elements have no headers or key.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from pydantic import Field

from connector import Message, RejectedError

from .keys import KeyTemplate
from .writer import CommandSink, Failures, Planned, RedisSinkConfig


class Side(StrEnum):
    left = "left"
    right = "right"


class RedisListSinkConfig(RedisSinkConfig):
    key: str = Field(min_length=1, description="list key template: {subject}, "
                     "{subject[N]}, {header[Name]}, {key}, {id}")
    push: Side = Field(Side.left, description="left: LPUSH (pair with a consumer popping "
                       "from the right, as the redis_list source does by default); "
                       "right: RPUSH")


class RedisListSink(CommandSink[RedisListSinkConfig]):
    """LPUSH/RPUSH to a Redis list (key from a template); payload only."""

    Config = RedisListSinkConfig

    def prepare(self) -> None:
        self._key = KeyTemplate(self.config.key)
        self._command = "LPUSH" if self.config.push is Side.left else "RPUSH"

    def plan(self, messages: Sequence[Message], rejected: Failures) -> Planned:
        limit = self.config.max_message_bytes
        per_command = self.config.chunk_size
        render = self._key.render
        groups: dict[str, tuple[list[int], list[bytes]]] = {}
        planned: Planned = []
        for i, m in enumerate(messages):
            if len(m.data) > limit:
                rejected[i] = RejectedError(
                    f"payload of {len(m.data)} bytes exceeds max_message_bytes {limit}")
                continue
            try:
                key = render(m)
            except RejectedError as exc:
                rejected[i] = exc
                continue
            group = groups.get(key)
            if group is None or len(group[0]) >= per_command:
                if group is not None:
                    planned.append((group[0], (self._command, key, *group[1])))
                group = groups[key] = ([], [])
            group[0].append(i)
            group[1].append(m.data)
        for key, (indices, values) in groups.items():
            planned.append((indices, (self._command, key, *values)))
        return planned
