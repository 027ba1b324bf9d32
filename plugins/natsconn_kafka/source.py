"""The ``kafka`` source: a consumer group member that commits only what the sink confirmed.

Offsets are committed per partition at the highest contiguous offset whose
messages the engine acknowledged (see :mod:`.offsets`), on a timer, on revoke
and on close; aiokafka's auto-commit is off. Backpressure: the engine reads
only when it has room, aiokafka's prefetch holds at most one fetch per
partition, a partition with too many uncommitted messages is paused, and
when the pipeline has had no room for ``stall_pause`` every partition is
paused (the prefetch is dropped; lag grows at the broker, not in memory).
The consumer stays in its group meanwhile: a background keep-alive polls with
every partition paused, so a long stall does not trigger a rebalance.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    GroupAuthorizationFailedError,
    IllegalStateError,
    KafkaError,
    TopicAuthorizationFailedError,
)
from pydantic import Field, field_validator, model_validator

from connector import (
    Batch,
    ByteSize,
    ConnectorError,
    Duration,
    Message,
    PluginConfig,
    RetryableError,
    Source,
)

from .connection import (
    KafkaConnectionConfig,
    client_options,
    map_broker_addresses,
    start_client,
)
from .headers import decode_bytes, decode_headers
from .offsets import Chunk, PartitionTracker

# Metadata headers added with ``metadata_headers: true`` (documented in docs/plugins/kafka.md).
H_TOPIC = "Natsconn-Kafka-Topic"
H_PARTITION = "Natsconn-Kafka-Partition"
H_OFFSET = "Natsconn-Kafka-Offset"
H_TIMESTAMP = "Natsconn-Kafka-Timestamp"

_EMPTY: dict[str, str] = {}
_NO_PARTITION = TopicPartition("", -1)  # polled for keep-alive only; never assigned


class StartPosition(StrEnum):
    committed = "committed"
    earliest = "earliest"
    latest = "latest"


class OffsetReset(StrEnum):
    earliest = "earliest"
    latest = "latest"


class IsolationLevel(StrEnum):
    read_committed = "read_committed"
    read_uncommitted = "read_uncommitted"


class KafkaSourceConfig(KafkaConnectionConfig):
    topics: list[str] | None = Field(None, min_length=1, description="topics to read")
    pattern: str | None = Field(None, description="regular expression: read every topic whose "
                                "whole name matches (instead of `topics`)")
    metadata_max_age: Duration = Field(
        300.0, gt=0, description="how often topic metadata is refreshed; with `pattern`, "
        "how soon a new matching topic is read (Kafka's metadata.max.age.ms)")
    group_id: str | None = Field(None, description="consumer group; default natsconn-<pipeline>")
    start: StartPosition = Field(StartPosition.committed, description="committed: go on from "
                                 "the group's committed offsets; earliest/latest: ignore them "
                                 "and seek when this process first gets a partition")
    reset: OffsetReset = Field(OffsetReset.earliest, description="where to begin a partition "
                               "the group has no (valid) committed offset for")
    commit_interval: Duration = Field(1.0, gt=0, description="how often confirmed offsets "
                                      "are committed (also on revoke and close)")
    max_pending_per_partition: int = Field(
        10_000, ge=1, description="pause a partition when this many of its messages are read "
        "and not yet committable; resume at half")
    stall_pause: Duration = Field(2.0, ge=0, description="pause every partition when the "
                                  "pipeline has had no room for this long; 0: never")
    fetch_max_bytes: ByteSize = Field(16 * 1024 * 1024, ge=1024,
                                      description="most data one fetch may return")
    max_partition_fetch_bytes: ByteSize = Field(1024 * 1024, ge=1024, description="most data "
                                                "one fetch returns per partition")
    fetch_max_wait: Duration = Field(0.5, ge=0, description="how long the broker may hold a "
                                     "fetch when it has no data")
    session_timeout: Duration = Field(10.0, gt=0)
    heartbeat_interval: Duration = Field(3.0, gt=0)
    max_poll_interval: Duration = Field(300.0, gt=0)
    isolation_level: IsolationLevel = Field(IsolationLevel.read_committed, description=
                                            "read_committed skips aborted transactions")
    static_membership: bool = Field(False, description="group.instance.id = "
                                    "<pipeline>-<instance>: a restarted replica gets its "
                                    "partitions back without a rebalance")
    key_header: str | None = Field(None, description="also put the record key in this header")
    metadata_headers: bool = Field(False, description="add Natsconn-Kafka-Topic, -Partition, "
                                   "-Offset and -Timestamp headers")

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"expected a regular expression, found {value!r}: {exc}") \
                    from None
        return value

    @model_validator(mode="after")
    def _one_subscription(self) -> KafkaSourceConfig:
        if (self.topics is None) == (self.pattern is None):
            raise ValueError("give exactly one of `topics` and `pattern`")
        if self.heartbeat_interval >= self.session_timeout:
            raise ValueError("heartbeat_interval must be shorter than session_timeout")
        return self


class KafkaAck:
    """Settles the chunks (one per partition) of one batch."""

    __slots__ = ("_chunks", "_source")

    def __init__(self, source: KafkaSource, chunks: list[Chunk]) -> None:
        self._source = source
        self._chunks = chunks

    async def ack(self) -> None:
        for chunk in self._chunks:
            chunk.tracker.ack(chunk)

    async def term(self, reason: str) -> None:
        # The engine logged and counted it; for offsets it is done.
        await self.ack()

    async def nack(self, delay: float | None = None) -> None:
        self._source._nack(self._chunks, delay)

    async def in_progress(self) -> None:
        return None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._source._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._source._assigned(set(assigned))


class KafkaSource(Source[KafkaSourceConfig]):
    """Kafka consumer group; commits offsets after the sink confirmed (at least once)."""

    Config = KafkaSourceConfig

    @classmethod
    def shareable(cls, config: PluginConfig) -> bool:
        """Replicas share the consumer group's partitions."""
        return True

    async def connect(self) -> None:
        cfg = self.config
        ctx = self.context
        self._group = cfg.group_id or f"natsconn-{ctx.pipeline}"
        self._parts: dict[TopicPartition, PartitionTracker] = {}
        self._held: set[TopicPartition] = set()  # too many pending
        self._delayed: dict[TopicPartition, float] = {}  # nacked with a delay: resume time
        self._to_seek: set[TopicPartition] = set()  # start earliest/latest, not yet done
        self._seeded: set[TopicPartition] = set()
        self._stalled = False
        self._lags: dict[TopicPartition, int] = {}
        self._poll_lock = asyncio.Lock()
        self._commit_lock = asyncio.Lock()
        self._last_read = time.monotonic()
        self._last_poll = time.monotonic()
        self._reading = False
        self._closed = False
        options = client_options(cfg, ctx)
        extra: dict[str, Any] = {}
        if cfg.static_membership:
            extra["group_instance_id"] = f"{ctx.pipeline}-{ctx.instance}"
        self._consumer = AIOKafkaConsumer(
            group_id=self._group,
            enable_auto_commit=False,
            auto_offset_reset=cfg.reset.value,
            fetch_max_bytes=cfg.fetch_max_bytes,
            max_partition_fetch_bytes=cfg.max_partition_fetch_bytes,
            fetch_max_wait_ms=int(cfg.fetch_max_wait * 1000),
            session_timeout_ms=int(cfg.session_timeout * 1000),
            heartbeat_interval_ms=int(cfg.heartbeat_interval * 1000),
            max_poll_interval_ms=int(cfg.max_poll_interval * 1000),
            isolation_level=cfg.isolation_level.value,
            metadata_max_age_ms=int(cfg.metadata_max_age * 1000),
            **extra,
            **options,
        )
        # aiokafka has no public handle on the consumer's client.
        map_broker_addresses(getattr(self._consumer, "_client", None), cfg)
        listener = _Listener(self)
        if cfg.pattern is not None:
            # Kafka matches the whole name, as Java's Pattern.matcher().matches() does.
            self._consumer.subscribe(pattern=f"^(?:{cfg.pattern})$", listener=listener)
        else:
            self._consumer.subscribe(topics=list(cfg.topics or ()), listener=listener)
        await start_client(self._consumer.start, self._consumer.stop, cfg,
                           f"consumer (group {self._group!r})")
        self._housekeeper = asyncio.create_task(self._housekeeping(),
                                                name=f"kafka-source:{ctx.pipeline}")

    # ------------------------------------------------------------ rebalances

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is confirmed for ``revoked``; drop their unconfirmed work."""
        await self._commit(revoked)
        for tp in revoked:
            tracker = self._parts.pop(tp, None)
            if tracker is not None:
                tracker.retire()
            self._held.discard(tp)
            self._delayed.pop(tp, None)
            self._to_seek.discard(tp)
            self._lags.pop(tp, None)
        if revoked:
            self.context.logger.info("kafka: %d partition(s) revoked", len(revoked))

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            if tp not in self._parts:  # else its first records came before this call
                self._parts[tp] = PartitionTracker(tp)
            if self.config.start is not StartPosition.committed and tp not in self._seeded:
                self._seeded.add(tp)
                self._to_seek.add(tp)
        self.context.logger.info("kafka: %d partition(s) assigned: %s", len(assigned),
                                 _names(assigned))

    # --------------------------------------------------------------- reading

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        self._reading = True
        try:
            await self._before_read()
            async with self._poll_lock:
                try:
                    records = await self._consumer.getmany(
                        timeout_ms=int(max_wait * 1000), max_records=max_messages)
                except (TopicAuthorizationFailedError, GroupAuthorizationFailedError) as exc:
                    raise ConnectorError(f"kafka: not authorized: {exc}") from None
                except KafkaError as exc:
                    raise RetryableError(f"kafka: {type(exc).__name__}: {exc}") from None
                self._last_poll = time.monotonic()
        finally:
            self._reading = False
            self._last_read = time.monotonic()
        if not records:
            return None
        return self._to_batch(records)

    async def _before_read(self) -> None:
        consumer = self._consumer
        if self._to_seek:
            tps = [tp for tp in self._to_seek if tp in self._parts]
            self._to_seek.clear()
            if tps:
                if self.config.start is StartPosition.earliest:
                    await consumer.seek_to_beginning(*tps)
                else:
                    await consumer.seek_to_end(*tps)
        now = time.monotonic()
        limit = self.config.max_pending_per_partition
        for tp, tracker in self._parts.items():
            if tp in self._held:
                if tracker.pending <= limit // 2:
                    self._held.discard(tp)
            elif tracker.pending >= limit:
                self._held.add(tp)
        for tp, until in list(self._delayed.items()):
            if until <= now:
                del self._delayed[tp]
        if self._stalled:
            self._stalled = False
            self.context.logger.info("kafka: the pipeline has room again; resuming")
        self._apply_pauses()

    def _apply_pauses(self) -> None:
        consumer = self._consumer
        want = (self._held | self._delayed.keys()) & self._parts.keys()
        if self._stalled:
            want = set(self._parts)
        have = consumer.paused()
        with contextlib.suppress(IllegalStateError):
            if want - have:
                consumer.pause(*(want - have))
            if have - want:
                consumer.resume(*(have - want))

    def _to_batch(self, records: dict[TopicPartition, list[Any]]) -> Batch | None:
        cfg = self.config
        key_header = cfg.key_header
        meta = cfg.metadata_headers
        messages: list[Message] = []
        chunks: list[Chunk] = []
        lags = self._lags
        for tp, recs in records.items():
            tracker = self._parts.get(tp)
            if tracker is None:
                if tp not in self._consumer.assignment():
                    continue  # revoked meanwhile: its next owner reads it from the commit
                # aiokafka hands out records of a new assignment a moment before it
                # calls on_partitions_assigned: start the partition's tracking here.
                tracker = self._parts[tp] = PartitionTracker(tp)
            if not recs or tp in self._to_seek:
                continue  # a seek to the start position reads these again
            chunks.append(tracker.read(recs[0].offset, recs[-1].offset, len(recs)))
            topic = tp.topic
            prefix = f"{topic}/{tp.partition}/"
            for r in recs:
                headers = decode_headers(r.headers) if r.headers else _EMPTY
                key = r.key
                if key_header is not None or meta:
                    headers = dict(headers)
                    if key_header is not None and key is not None:
                        headers[key_header] = decode_bytes(key)
                    if meta:
                        headers[H_TOPIC] = topic
                        headers[H_PARTITION] = str(tp.partition)
                        headers[H_OFFSET] = str(r.offset)
                        headers[H_TIMESTAMP] = str(r.timestamp)
                messages.append(Message(
                    r.value if r.value is not None else b"", topic, key, headers,
                    r.timestamp / 1000.0 if r.timestamp is not None and r.timestamp >= 0
                    else None,
                    prefix + str(r.offset)))
            try:
                high = self._consumer.highwater(tp)
            except AssertionError:
                high = None
            if high is not None:
                lags[tp] = max(0, high - recs[-1].offset - 1)
        self.context.meters.lag(sum(lags.values()))
        if not messages:
            return None
        return Batch(messages, KafkaAck(self, chunks))

    def _nack(self, chunks: list[Chunk], delay: float | None) -> None:
        """Read the nacked chunks again: seek each partition back (after ``delay``)."""
        for chunk in chunks:
            offset = chunk.tracker.nack(chunk)
            if offset is None:
                continue
            tp = chunk.tracker.tp
            if not isinstance(tp, TopicPartition):
                continue
            try:
                self._consumer.seek(tp, offset)
            except IllegalStateError:
                continue  # revoked meanwhile: the next owner reads it from the commit
            if delay:
                self._delayed[tp] = time.monotonic() + delay
        if delay:
            self._apply_pauses()

    # ----------------------------------------------------------- background

    async def _housekeeping(self) -> None:
        """Commit on a timer; pause on a stall and keep the group membership; lag."""
        cfg = self.config
        tick = min(cfg.commit_interval, 0.5)
        keepalive = max(1.0, min(30.0, cfg.max_poll_interval / 4))
        next_commit = time.monotonic() + cfg.commit_interval
        next_lag = time.monotonic() + 5.0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            try:
                if now >= next_commit:
                    next_commit = now + cfg.commit_interval
                    await self._commit()
                idle = not self._reading and now - self._last_read
                if idle and cfg.stall_pause and idle >= cfg.stall_pause and not self._stalled:
                    self._stalled = True
                    self._apply_pauses()
                    self.context.logger.info(
                        "kafka: the pipeline has had no room for %.1fs; paused %d "
                        "partition(s)", idle, len(self._parts))
                    next_lag = now  # show the lag growing from now on
                if self._stalled and now - self._last_poll >= keepalive:
                    await self._keepalive()
                if now >= next_lag:
                    next_lag = now + 5.0
                    await self._refresh_lag()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.context.logger.warning("kafka: background work failed: %s", exc)

    async def _keepalive(self) -> None:
        """Poll without taking any record, so that the group does not evict us."""
        async with self._poll_lock:
            if not self._stalled or self._reading:
                return
            await self._consumer.getmany(_NO_PARTITION, timeout_ms=0)
            self._last_poll = time.monotonic()

    async def _refresh_lag(self) -> None:
        """Lag from the brokers' end offsets: works while partitions are paused."""
        consumer = self._consumer
        tps = list(self._parts)
        if not tps:
            self.context.meters.lag(0)
            return
        ends = await consumer.end_offsets(tps)
        for tp, end in ends.items():
            tracker = self._parts.get(tp)
            if tracker is None:
                continue
            if tracker.next_read is not None:
                position = tracker.next_read
            else:
                try:
                    position = await consumer.position(tp)
                except (IllegalStateError, KafkaError):
                    continue
            self._lags[tp] = max(0, end - position)
        self.context.meters.lag(sum(self._lags.values()))

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        async with self._commit_lock:
            offsets: dict[TopicPartition, int] = {}
            trackers: list[tuple[PartitionTracker, int]] = []
            for tp, tracker in self._parts.items():
                if only is not None and tp not in only:
                    continue
                offset = tracker.to_commit()
                if offset is not None:
                    offsets[tp] = offset
                    trackers.append((tracker, offset))
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                self.context.logger.warning("kafka: offset commit refused (%s); the "
                                            "partitions' next owner re-reads from the last "
                                            "commit", exc)
                return
            except KafkaError as exc:
                self.context.logger.warning("kafka: offset commit failed, will retry: %s", exc)
                return
            for tracker, offset in trackers:
                tracker.committed = offset

    # ---------------------------------------------------------------- close

    async def close(self) -> None:
        consumer = getattr(self, "_consumer", None)
        if consumer is None or self._closed:
            return
        self._closed = True
        task = getattr(self, "_housekeeper", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        try:
            await asyncio.wait_for(self._commit(), self.config.request_timeout)
        except Exception as exc:
            self.context.logger.warning("kafka: final offset commit failed: %s", exc)
        finally:
            await consumer.stop()


def _names(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}/{tp.partition}" for tp in tps)) or "none"
