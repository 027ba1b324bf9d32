"""The ``redis_kv`` sink: SET, or HSET into a hash; optional TTL.

``command: set`` writes each message's payload under a key from a template
(the last message for a key wins). ``command: hset`` writes it as one field of
a hash: the hash's key and the field name both come from templates. ``ttl``
gives the key (for hset: the whole hash) an expiry, renewed by every write.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from pydantic import Field, model_validator

from connector import AddressTemplate, Duration, Message

from .keys import KeyTemplate
from .writer import Command, CommandSink, Failures, Planned, RedisSinkConfig


class KvCommand(StrEnum):
    set = "set"
    hset = "hset"


class RedisKvSinkConfig(RedisSinkConfig):
    key: str = Field(min_length=1, description="key template: {subject}, {subject[N]}, "
                     "{header[Name]}, {key}, {id}")
    command: KvCommand = Field(KvCommand.set, description="set: the key holds the payload; "
                               "hset: the key is a hash, the payload one of its fields")
    field: str | None = Field(None, description="hash field template, for command hset")
    ttl: Duration | None = Field(None, gt=0, description="expiry of the key after each "
                                 "write; null: none")

    @model_validator(mode="after")
    def _field(self) -> RedisKvSinkConfig:
        if self.command is KvCommand.hset and not self.field:
            raise ValueError("command hset needs field, a template such as '{key}' or "
                             "'{subject[-1]}'")
        if self.command is KvCommand.set and self.field:
            raise ValueError("field is for command hset only")
        return self


class RedisKvSink(CommandSink[RedisKvSinkConfig]):
    """SET a key, or HSET a hash field, from each message (key from a template)."""

    Config = RedisKvSinkConfig

    def prepare(self) -> None:
        cfg = self.config
        self._key = KeyTemplate(cfg.key)
        self._field = AddressTemplate(cfg.field) if cfg.field else None
        self._ttl_ms = None if cfg.ttl is None else max(1, int(cfg.ttl * 1000))

    def plan(self, messages: Sequence[Message], rejected: Failures) -> Planned:
        key_of = self._key.render
        ttl = self._ttl_ms
        field = self._field

        if field is None:
            def build(m: Message) -> Command | tuple[Command, ...]:
                if ttl is None:
                    return ("SET", key_of(m), m.data)
                return ("SET", key_of(m), m.data, "PX", ttl)
        else:
            field_of = field.render

            def build(m: Message) -> Command | tuple[Command, ...]:
                key = key_of(m)
                hset = ("HSET", key, field_of(m), m.data)
                if ttl is None:
                    return hset
                return (hset, ("PEXPIRE", key, ttl))

        return self.checked(messages, rejected, build)
