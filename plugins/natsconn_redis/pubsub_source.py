"""The ``redis_pubsub`` source: channels and patterns (SUBSCRIBE, PSUBSCRIBE).

At most once, by the nature of Redis pub/sub: Redis keeps nothing for a
subscriber, so what is published while natsconn is down or reconnecting is
lost, and nothing is ever redelivered. What natsconn can do is make the losses
visible: every lost connection counts ``natsconn_disconnects_total`` and every
recovery ``natsconn_reconnects_total`` (the log gives how long the window
was); messages that arrive while the buffer is full are dropped and counted
in ``natsconn_dropped_total``.

A reader task owns the subscribed connection. It sends a PING every
``ping_interval`` and treats a missing PONG (within ``socket_timeout``) as a
dead connection, so a silently stalled link is noticed too. After a loss it
subscribes again on a new connection, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, ClassVar

from pydantic import Field, model_validator
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError

from connector import Batch, Duration, Message, PushBuffer, Source

from .connection import TEXT_ERRORS, RedisConnectionConfig, RedisLink, connect_error, open_link

_DATA = {"message", "pmessage"}
_CONFIRM = {"subscribe", "psubscribe"}


class RedisPubSubSourceConfig(RedisConnectionConfig):
    keyed: ClassVar[bool] = False  # any cluster node serves pub/sub
    channels: list[str] = Field(default_factory=list, description="channel names")
    patterns: list[str] = Field(default_factory=list, description="channel patterns "
                                "(PSUBSCRIBE), e.g. orders.*")
    buffer_messages: int = Field(100_000, ge=1, description="messages held for the "
                                 "pipeline; beyond this they are dropped and counted")
    ping_interval: Duration = Field(5.0, gt=0, description="PING on the subscribed "
                                    "connection this often to notice a dead link")

    @model_validator(mode="after")
    def _something(self) -> RedisPubSubSourceConfig:
        if not self.channels and not self.patterns:
            raise ValueError("give channels, patterns or both")
        if self.cluster:
            raise ValueError("cluster: true is not supported by redis_pubsub; subscribe "
                             "to one node of the cluster (it sees every PUBLISH)")
        return self


class RedisPubSubSource(Source[RedisPubSubSourceConfig]):
    """Redis pub/sub channels and patterns (at most once; losses counted)."""

    Config = RedisPubSubSourceConfig

    async def connect(self) -> None:
        cfg = self.config
        self._buffer: PushBuffer[Message] = PushBuffer(cfg.buffer_messages)
        # redis-py's own socket timeout stays on here: every read passes its own
        # timeout, and redis-py reconnects and subscribes again by itself.
        self._link: RedisLink = await open_link(cfg, self.context, per_reply_timeout=True)
        self._pubsub: PubSub | None = None
        self._overflow = 0
        try:
            self._pubsub = await self._subscribe()
        except Exception as exc:
            await self._link.close()
            raise connect_error(cfg, exc) from None
        self._task = asyncio.create_task(self._run(), name="redis-pubsub-reader")

    async def _subscribe(self) -> PubSub:
        """A new subscribed connection; returns once Redis confirmed every subscription."""
        cfg = self.config
        pubsub = self._link.client.pubsub()
        try:
            if cfg.channels:
                await pubsub.subscribe(*cfg.channels)
            if cfg.patterns:
                await pubsub.psubscribe(*cfg.patterns)
            expected = len(set(cfg.channels)) + len(set(cfg.patterns))
            deadline = time.monotonic() + cfg.socket_timeout
            while expected > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionError("subscriptions not confirmed in time")
                reply = await pubsub.get_message(timeout=left)
                if reply is None:
                    continue
                if reply["type"] in _CONFIRM:
                    expected -= 1
                else:
                    self._deliver(reply)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2
            raise
        return pubsub

    def _deliver(self, reply: dict[str, Any]) -> None:
        if reply["type"] not in _DATA:
            return
        buffer = self._buffer
        if buffer.full():
            self._overflow += 1  # reported in bulk by _report_overflow
            return
        channel = reply["channel"]
        data = reply["data"]
        buffer.push(Message(data if isinstance(data, bytes) else str(data).encode(),
                            channel.decode("utf-8", TEXT_ERRORS), None, {}, time.time()))

    def _report_overflow(self) -> None:
        if self._overflow:
            count, self._overflow = self._overflow, 0
            self.context.meters.dropped(
                count, "redis pub/sub: buffer_messages full, the pipeline fell behind")

    async def _run(self) -> None:
        cfg = self.config
        wait = cfg.reconnect.initial_backoff
        while True:
            pubsub = self._pubsub
            try:
                if pubsub is None:
                    pubsub = self._pubsub = await self._subscribe()
                    wait = cfg.reconnect.initial_backoff
                    self._link.restored()
                await self._pump(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._link.lost(exc)
                self._pubsub = None
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2
                await asyncio.sleep(wait)
                wait = min(cfg.reconnect.max_backoff, max(wait * 2, 0.01))

    async def _pump(self, pubsub: PubSub) -> None:
        cfg = self.config
        deliver = self._deliver
        last_ping = time.monotonic()
        awaiting_pong: float | None = None
        while True:
            reply = await pubsub.get_message(timeout=min(1.0, cfg.ping_interval))
            if reply is not None:
                self._link.restored()  # e.g. redis-py reconnected and subscribed again
                if reply["type"] == "pong":
                    awaiting_pong = None
                else:
                    deliver(reply)
                    continue
            now = time.monotonic()
            self._report_overflow()
            if awaiting_pong is not None:
                if now - awaiting_pong > cfg.socket_timeout:
                    raise ConnectionError(f"no PONG within {cfg.socket_timeout}s")
            elif now - last_ping >= cfg.ping_interval:
                await pubsub.ping()
                awaiting_pong = last_ping = now

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        self._report_overflow()
        messages = await self._buffer.take(max_messages, max_wait)
        return Batch(messages) if messages else None

    async def close(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        pubsub = getattr(self, "_pubsub", None)
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            self._pubsub = None
        buffer = getattr(self, "_buffer", None)
        if buffer is not None:
            self._report_overflow()
        if buffer is not None and len(buffer):
            self.context.meters.dropped(len(buffer.take_all()),
                                        "received but unread at close (redis pub/sub)")
        link = getattr(self, "_link", None)
        if link is not None:
            await link.close()
