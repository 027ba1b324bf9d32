"""The ``jetstream`` source: a durable pull consumer read through one long-lived inbox.

Pull requests for a whole prefetch window go out ahead of need and the
messages arrive by callback into a buffer, so reads never wait a round trip
(nats-py's ``fetch()`` loop does, and is several times slower). Each message is
acknowledged only after the sink confirmed it; ``nack`` asks for redelivery
after a delay, ``term`` stops redelivery of poison.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.errors import NotFoundError
from pydantic import Field, model_validator

from connector import (
    Batch,
    ByteSize,
    ConnectorError,
    Duration,
    Message,
    PluginConfig,
    PushBuffer,
    Source,
)

from .buffer_age import BufferAge
from .connection import Client, NatsConnectionConfig, open_connection

_STATUS = "Status"
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_Raw = tuple[str, str, bytes, "dict[str, str] | None"]  # subject, reply, data, headers
_PENDING = "Nats-Pending-Messages"


class DeliverPolicy(StrEnum):
    all = "all"
    new = "new"
    last = "last"
    last_per_subject = "last_per_subject"
    by_start_sequence = "by_start_sequence"
    by_start_time = "by_start_time"


class JetStreamSourceConfig(NatsConnectionConfig):
    stream: str = Field(description="the stream to read")
    subjects: list[str] | None = Field(
        None, description="create the stream with these subjects if it does not exist")
    durable: str | None = Field(None, description="durable consumer name, shared by "
                                "replicas; default natsconn-<pipeline>")
    filter_subjects: list[str] = Field(default_factory=list)
    deliver_policy: DeliverPolicy = DeliverPolicy.all
    start_sequence: int | None = Field(None, ge=1, description="for by_start_sequence")
    start_time: str | None = Field(None, description="RFC 3339, for by_start_time")
    ack_wait: Duration = Field(30.0, description="redelivery after this without an ack")
    max_ack_pending: int = Field(20_000, ge=1)
    max_deliver: int = Field(-1, description="-1: redeliver for ever")
    prefetch: int = Field(10_000, ge=1, description="messages requested ahead of reads, "
                          "at most")
    prefetch_bytes: ByteSize = Field(
        16 * 1024 * 1024, description="about how many payload bytes may be requested ahead "
        "of reads; the window shrinks to fit large messages")
    pull_expires: Duration = Field(2.0, gt=0.1, description="lifetime of one pull request; "
                                   "also the longest a close waits for open requests")
    domain: str | None = Field(None, description="JetStream domain")

    @model_validator(mode="after")
    def _start(self) -> JetStreamSourceConfig:
        if self.deliver_policy is DeliverPolicy.by_start_sequence and self.start_sequence is None:
            raise ValueError("deliver_policy by_start_sequence needs start_sequence")
        if self.deliver_policy is DeliverPolicy.by_start_time and self.start_time is None:
            raise ValueError("deliver_policy by_start_time needs start_time")
        return self


class JetStreamAck:
    """Acks for the messages of one batch, by their reply subjects: one buffer
    append per batch, not one publish per message.

    Until it is settled the handle sits in the source's ``unsettled`` set, with
    ``touched``: a time no later than the last delivery or ``+WPI`` of any of its
    messages. The source's keeper sends ``+WPI`` for the handles not touched for
    a third of ``ack_wait``, whatever the pipeline's ``in_progress_interval``."""

    __slots__ = ("_nc", "_replies", "_unsettled", "touched")

    def __init__(self, nc: Client, replies: list[str], unsettled: set[JetStreamAck],
                 touched: float) -> None:
        self._nc = nc
        self._replies = replies
        self._unsettled = unsettled
        self.touched = touched
        unsettled.add(self)

    @property
    def replies(self) -> list[str]:
        return self._replies

    async def ack(self) -> None:
        self._unsettled.discard(self)
        await self._nc.publish_replies(self._replies, b"+ACK")

    async def nack(self, delay: float | None = None) -> None:
        self._unsettled.discard(self)
        payload = b'-NAK {"delay": %d}' % int(delay * 1e9) if delay else b"-NAK"
        await self._nc.publish_replies(self._replies, payload)

    async def term(self, reason: str) -> None:
        self._unsettled.discard(self)
        text = " ".join(reason.split()).encode()[:512]
        await self._nc.publish_replies(self._replies, b"+TERM " + text)

    async def in_progress(self) -> None:
        self.touched = time.monotonic()
        await self._nc.publish_replies(self._replies, b"+WPI")


def _metadata(reply: str) -> tuple[str, str, float, int]:
    """(stream, stream sequence, timestamp, pending) from a ``$JS.ACK`` reply subject."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.stream.consumer.delivered.sseq.cseq.ts.pending
        return t[2], t[5], int(t[7]) / 1e9, int(t[8])
    # $JS.ACK.domain.account.stream.consumer.delivered.sseq.cseq.ts.pending[.token]
    return t[4], t[7], int(t[9]) / 1e9, int(t[10])


class JetStreamSource(Source[JetStreamSourceConfig]):
    """JetStream durable pull consumer; acks after the sink confirmed (at least once)."""

    Config = JetStreamSourceConfig

    @classmethod
    def shareable(cls, config: PluginConfig) -> bool:
        """Replicas share one durable consumer."""
        return True

    async def connect(self) -> None:
        cfg = self.config
        self._durable = cfg.durable or f"natsconn-{self.context.pipeline}"
        self._requested = 0  # messages asked for and not yet arrived
        self._closing = False
        self._requests_done = asyncio.Event()  # set once closing and none is open
        self._avg_size = 8192.0  # payload bytes per message, learnt as they arrive
        self._last_seen = time.monotonic()
        self._fatal: str | None = None
        self._nc: Client = await open_connection(cfg, self.context, self._on_reconnect)
        js = self._nc.jetstream(domain=cfg.domain)
        await self._ensure_stream(js)
        await self._ensure_consumer(js)
        prefix = f"$JS.{cfg.domain}.API" if cfg.domain else "$JS.API"
        self._next_subject = f"{prefix}.CONSUMER.MSG.NEXT.{cfg.stream}.{self._durable}"
        self._inbox = self._nc.new_inbox()
        self._buffer: PushBuffer[_Raw] = PushBuffer()
        self._age = BufferAge()
        self._unsettled: set[JetStreamAck] = set()  # handed out, not yet settled
        self._tick = max(cfg.ack_wait / 6, 0.05)
        self._sub: Subscription = await self._nc.subscribe_direct(self._inbox, self._on_message)
        await self._refill(1)
        await self._nc.flush()
        self._keeper = asyncio.create_task(self._keep_buffer_alive())

    async def _ensure_stream(self, js: object) -> None:
        cfg = self.config
        try:
            await js.stream_info(cfg.stream)  # type: ignore[attr-defined]
        except NotFoundError:
            if not cfg.subjects:
                raise ConnectorError(
                    f"stream {cfg.stream!r} does not exist; create it, or give `subjects:` "
                    "so that natsconn creates it") from None
            await js.add_stream(name=cfg.stream, subjects=cfg.subjects)  # type: ignore[attr-defined]
            self.context.logger.info("created stream %s for %s", cfg.stream, cfg.subjects)

    async def _ensure_consumer(self, js: object) -> None:
        cfg = self.config
        consumer = api.ConsumerConfig(
            name=self._durable,
            durable_name=self._durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=cfg.ack_wait,
            max_ack_pending=cfg.max_ack_pending,
            max_deliver=cfg.max_deliver,
            deliver_policy=api.DeliverPolicy(cfg.deliver_policy.value),
            opt_start_seq=cfg.start_sequence,
            filter_subjects=cfg.filter_subjects or None,
            max_waiting=512,
        )
        if cfg.start_time is not None:
            consumer.opt_start_time = cfg.start_time  # type: ignore[assignment]
        try:
            await js.add_consumer(cfg.stream, consumer)  # type: ignore[attr-defined]
        except Exception as exc:
            raise ConnectorError(
                f"cannot create or bind consumer {self._durable!r} on stream "
                f"{cfg.stream!r}: {exc}") from None

    async def _on_reconnect(self) -> None:
        self._requested = 0  # the server forgot our pull requests with the old connection

    def _on_message(self, subject: str, reply: str, data: bytes,
                    headers: dict[str, str] | None) -> None:
        """From the read loop (direct delivery): statuses settle the pull window,
        messages go to the buffer. The window bounds what arrives."""
        self._last_seen = time.monotonic()
        if headers is not None and _STATUS in headers and not data:
            self._on_status(headers)
            return
        self._requested -= 1
        self._avg_size += (len(data) - self._avg_size) * 0.01
        self._buffer.push((subject, reply, data, headers))
        if self._closing and self._requested <= 0:
            self._requests_done.set()

    def _on_status(self, headers: dict[str, str]) -> None:
        code = headers[_STATUS]
        if code == "100":  # idle heartbeat
            return
        pending = headers.get(_PENDING)
        if pending is not None and pending.isdigit():
            self._requested = max(0, self._requested - int(pending))
        else:
            self._requested = 0
        if self._closing and self._requested <= 0:
            self._requests_done.set()
        if code == "409":
            # nats-py keys the description with an enum member, not the string
            desc = " ".join(str(v) for k, v in headers.items() if str(k).endswith("Description")
                            or getattr(k, "value", None) == "Description")
            if "Deleted" in desc or "push based" in desc:
                self._fatal = f"consumer {self._durable!r}: {desc}"

    async def _pull(self, n: int) -> None:
        cfg = self.config
        # max_bytes bounds each request even when sizes jump; never below the largest
        # message the server allows, or one big message would end every request.
        max_bytes = max(cfg.prefetch_bytes, self._nc.max_payload + 4096)
        request = {"batch": n, "expires": int(cfg.pull_expires * 1e9), "max_bytes": max_bytes}
        await self._nc.publish(self._next_subject, json.dumps(request).encode(),
                               reply=self._inbox)
        self._requested += n

    async def _refill(self, max_messages: int) -> None:
        if self._closing:
            return
        if self._requested > 0 and time.monotonic() - self._last_seen > (
            self.config.pull_expires + 5
        ):
            self._requested = 0  # a lost request or status (connection blip)
        cfg = self.config
        by_bytes = int(cfg.prefetch_bytes / max(self._avg_size, 1.0))
        want = max(min(cfg.prefetch, by_bytes), 2 * max_messages, 1)
        have = self._requested + len(self._buffer)
        if have < want // 2:
            await self._pull(want - have)

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        if self._fatal is not None:
            raise ConnectorError(self._fatal)
        await self._refill(max_messages)
        msgs = await self._buffer.take(max_messages, max_wait)
        if not msgs:
            return None
        # The oldest of these may have been delivered (or kept alive) this long ago:
        # what the buffer's marks say, plus the tick they may lag by.
        now = time.monotonic()
        touched = now - self._age.oldest_wait(now) - self._tick
        self._age.taken += len(msgs)
        await self._refill(max_messages)
        messages = []
        replies = []
        for subject, reply, data, headers in msgs:
            t = reply.split(".")
            if len(t) == 9:  # $JS.ACK.stream.consumer.delivered.sseq.cseq.ts.pending
                ident, ts = f"{t[2]}:{t[5]}", int(t[7]) / 1e9
            else:
                stream, seq, ts, _ = _metadata(reply)
                ident = f"{stream}:{seq}"
            messages.append(Message(data, subject, None, headers or _NO_HEADERS, ts, ident))
            replies.append(reply)
        self.context.meters.lag(_metadata(replies[-1])[3])
        return Batch(messages, JetStreamAck(self._nc, replies, self._unsettled, touched))

    async def _keep_buffer_alive(self) -> None:
        """Tell the server the messages still in hand are in progress (``+WPI``)
        once they have waited a third of ``ack_wait``, so that a stalled sink does
        not turn them into redeliveries: the prefetched ones in the buffer (see
        buffer_age) and the batches handed to the engine and not yet settled
        (queued in a lane, being written or retried). The latter are the engine's
        to keep alive too (``in_progress_interval``), but that interval is the
        pipeline's, 5 s by default, and ``ack_wait`` may be shorter: the source
        knows its own deadline and keeps it, checking every sixth of it."""
        ack_wait = self.config.ack_wait
        tick = self._tick
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            # Everything pushed is taken or still buffered: counted here, once a
            # tick, rather than once per message in the read loop.
            self._age.pushed = self._age.taken + len(self._buffer)
            self._age.mark(now)
            replies: list[str] = []
            buffered = self._age.oldest_wait(now) >= ack_wait / 3
            if buffered:
                replies = [raw[1] for raw in self._buffer.peek_all()]
            due = [a for a in self._unsettled if now - a.touched >= ack_wait / 3]
            for handle in due:
                replies += handle.replies
            if not replies:
                continue
            try:
                await self._nc.publish_replies(replies, b"+WPI")
            except Exception as exc:  # closed or reconnecting: the next tick tries again
                self.context.logger.debug("in-progress for messages in hand: %s", exc)
                continue
            if buffered:
                self._age.refreshed(now)
            for handle in due:
                handle.touched = now
            self.context.logger.debug("%d message(s) in hand kept from redelivery "
                                      "(%d unsettled batch(es))", len(replies), len(due))

    async def close(self) -> None:
        keeper = getattr(self, "_keeper", None)
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        nc = getattr(self, "_nc", None)
        if nc is None:
            return
        try:
            if nc.is_connected:
                # A pull request still open would take the messages NAKed below (the
                # server learns of our unsubscribe only by failing a delivery), so
                # let open requests finish first: a full one at once, an idle one when
                # it expires (pull_expires). What arrives meanwhile is NAKed too.
                self._closing = True
                if self._requested > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._requests_done.wait(),
                                               self.config.pull_expires + 0.5)
                await self._sub.unsubscribe()
                unread = self._buffer.take_all()  # hand them back now, not after ack_wait
                await nc.publish_replies([raw[1] for raw in unread], b"-NAK")
                await nc.flush(timeout=5)
        except Exception as exc:
            self.context.logger.warning("closing jetstream source: %s", exc)
        finally:
            await nc.close()
