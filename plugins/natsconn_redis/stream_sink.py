"""The ``redis_stream`` sink: XADD, one pipelined round trip per batch.

Each message becomes one entry (field mapping in :mod:`.fields`), with an id
chosen by Redis. ``maxlen`` trims the stream as it grows (``MAXLEN ~ n``, which
lets Redis trim whole nodes: cheap; ``exact_maxlen`` trims to the entry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from connector import Message, RejectedError

from .fields import EntryEncoder, FieldMapping
from .keys import KeyTemplate
from .writer import Command, CommandSink, Failures, Planned, RedisSinkConfig


class RedisStreamSinkConfig(RedisSinkConfig, FieldMapping):
    stream: str = Field(min_length=1, description="stream key template: {subject}, "
                        "{subject[N]}, {header[Name]}, {key}, {id}")
    maxlen: int | None = Field(None, ge=1, description="trim the stream to about this many "
                               "entries (MAXLEN ~); null: no trimming")
    exact_maxlen: bool = Field(False, description="trim to exactly maxlen (slower)")
    id_field: str | None = Field(None, description="also write Message.id in this field, "
                                 "e.g. natsconn-id; null: not written")
    create_stream: bool = Field(True, description="false: a missing stream is not created "
                                "(NOMKSTREAM); its messages are rejected (dead-lettered)")


class RedisStreamSink(CommandSink[RedisStreamSinkConfig]):
    """XADD to a Redis stream (name from a template), pipelined per batch."""

    Config = RedisStreamSinkConfig

    def prepare(self) -> None:
        cfg = self.config
        self._stream = KeyTemplate(cfg.stream)
        self._encoder = EntryEncoder(cfg, cfg.id_field)
        options: list[str | int] = []
        if not cfg.create_stream:
            options.append("NOMKSTREAM")
        if cfg.maxlen is not None:
            options += ["MAXLEN", "=" if cfg.exact_maxlen else "~", cfg.maxlen]
        options.append("*")
        self._options = tuple(options)

    def plan(self, messages: Sequence[Message], rejected: Failures) -> Planned:
        render = self._stream.render
        fields = self._encoder.fields
        options = self._options

        def build(m: Message) -> Command:
            return ("XADD", render(m), *options, *fields(m))

        return self.checked(messages, rejected, build)

    def reply_error(self, reply: Any, args: Command) -> RejectedError | None:
        if reply is None:  # NOMKSTREAM and no such stream
            return RejectedError(f"stream {args[1]!r} does not exist and create_stream is "
                                 "false")
        return None
