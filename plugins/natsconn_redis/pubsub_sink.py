"""The ``redis_pubsub`` sink: PUBLISH, one pipelined round trip per batch.

Only the payload travels: Redis pub/sub messages have no headers or key. A
message published while no one is subscribed is gone; Redis reports that as
zero receivers, which is not an error here (pub/sub is at most once by nature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field, model_validator

from connector import AddressTemplate, Message

from .writer import Command, CommandSink, Failures, Planned, RedisSinkConfig


class RedisPubSubSinkConfig(RedisSinkConfig):
    keyed: ClassVar[bool] = False  # any cluster node serves pub/sub
    channel: str = Field(min_length=1, description="channel template: {subject}, "
                         "{subject[N]}, {header[Name]}, {key}, {id}")

    @model_validator(mode="after")
    def _no_cluster(self) -> RedisPubSubSinkConfig:
        if self.cluster:
            raise ValueError("cluster: true is not supported by redis_pubsub; publish to "
                             "one node of the cluster (it forwards to the others)")
        return self


class RedisPubSubSink(CommandSink[RedisPubSubSinkConfig]):
    """PUBLISH to a Redis channel (name from a template); payload only."""

    Config = RedisPubSubSinkConfig

    def prepare(self) -> None:
        self._channel = AddressTemplate(self.config.channel)

    def plan(self, messages: Sequence[Message], rejected: Failures) -> Planned:
        render = self._channel.render

        def build(m: Message) -> Command:
            return ("PUBLISH", render(m), m.data)

        return self.checked(messages, rejected, build)
