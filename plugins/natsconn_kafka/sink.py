"""The ``kafka`` sink: a batch's records built into Kafka record batches here.

Each sink batch is split by topic and partition into aiokafka record batches
(``create_batch()`` / ``send_batch()``): a keyed record goes to the partition
Kafka's default partitioner picks (murmur2 of the key, as aiokafka's
``send()`` and the Java client do), keyless records of one write go together
to one partition, the next write to the next. The batches are handed to the
producer complete (no linger) and the write waits once for all of them. This
skips aiokafka's per-message ``send()`` path, which was half of the sink's CPU.
The producer is idempotent with ``acks=all`` by default: its own retries add
no duplicates.

Per-message errors are mapped: a record too large, an invalid topic name, or a
topic that does not exist and that the broker does not create are
:class:`RejectedError` (dead-lettered); everything else is retryable. When the
broker refuses a record batch of several records as too large, each of its
records is sent again alone, so one oversized message does not take good ones
to the dead-letter target with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    BrokerResponseError,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerClosed,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from pydantic import Field, field_validator, model_validator

from connector import (
    AddressTemplate,
    ByteSize,
    ConfigError,
    Duration,
    Message,
    PartialWriteError,
    RejectedError,
    RetryableError,
    Sink,
)

from .connection import (
    KafkaConnectionConfig,
    client_options,
    map_broker_addresses,
    start_client,
)
from .headers import encode_headers, encode_text

# Added with ``metadata_headers: true`` (the names the engine uses on dead letters).
H_SOURCE_ID = "Natsconn-Source-Id"
H_SUBJECT = "Natsconn-Original-Subject"

_LEGAL_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
# Broker answers no retry cures.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
# Errors after which the producer is rebuilt before the next write (its
# idempotence state cannot be trusted any more).
_FATAL_NAMES = {"OutOfOrderSequenceNumber", "UnknownProducerId", "InvalidProducerEpoch",
                "ProducerFenced", "InvalidProducerIdMapping", "DuplicateSequenceNumber"}


class Compression(StrEnum):
    none = "none"
    gzip = "gzip"
    snappy = "snappy"
    lz4 = "lz4"
    zstd = "zstd"


def _codec_available(codec: Compression) -> bool:
    from aiokafka import codec as codecs

    check = {
        Compression.gzip: codecs.has_gzip,
        Compression.snappy: codecs.has_snappy,
        Compression.lz4: codecs.has_lz4,
        Compression.zstd: codecs.has_zstd,
    }[codec]
    return bool(check())


class KafkaSinkConfig(KafkaConnectionConfig):
    topic: str = Field("{subject}", description="topic template: {subject}, {subject[N]}, "
                       "{header[Name]}, {key}, {id}")
    key: str | None = Field(None, description="key template such as '{subject[2]}' or "
                            "'{header[Order-Id]}'; default: the message's own key")
    acks: Literal["all", 1, 0] = Field("all", description="all: the in-sync replicas have "
                                       "the record; 1: the leader has it; 0: no wait")
    enable_idempotence: bool = Field(True, description="no duplicates from the producer's "
                                     "own retries; needs acks: all")
    linger: Duration = Field(0.005, ge=0, description="unused: the sink hands the producer "
                             "complete record batches, sent at once (the pipeline's "
                             "batch.max_wait collects messages); accepted so that existing "
                             "files stay valid")
    max_batch_size: ByteSize = Field(512 * 1024, ge=1024, description="record batch size "
                                     "per partition")
    max_request_size: ByteSize = Field(1024 * 1024, ge=1024, description="largest record "
                                       "(and request) the producer sends; larger messages "
                                       "are rejected")
    compression: Compression = Field(Compression.none, description="gzip, snappy, lz4 or "
                                     "zstd; the last three need the python package cramjam "
                                     "(pip install 'natsconn[kafka-compression]')")
    metadata_timeout: Duration = Field(10.0, gt=0, description="longest wait for an unknown "
                                       "topic to appear (created by the broker) before its "
                                       "messages are rejected")
    keep_timestamp: bool = Field(True, description="use the message's timestamp as the "
                                 "record's; otherwise the producer's clock")
    metadata_headers: bool = Field(False, description="add Natsconn-Source-Id and "
                                   "Natsconn-Original-Subject headers")

    @field_validator("topic", "key")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                AddressTemplate(value)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("compression")
    @classmethod
    def _codec(cls, value: Compression) -> Compression:
        if value is not Compression.none and not _codec_available(value):
            raise ValueError(f"compression {value.value} needs the python package cramjam, "
                             "which is not installed: pip install 'natsconn[kafka-compression]'")
        return value

    @model_validator(mode="after")
    def _acks(self) -> KafkaSinkConfig:
        if self.enable_idempotence and self.acks != "all":
            raise ValueError(f"acks {self.acks} needs enable_idempotence: false")
        if self.max_batch_size > self.max_request_size:
            raise ValueError("max_batch_size must not exceed max_request_size")
        topic = AddressTemplate(self.topic)
        if topic.is_constant and not _LEGAL_TOPIC.match(self.topic):
            raise ValueError(f"invalid Kafka topic {self.topic!r}: {_TOPIC_RULE}")
        return self


_TOPIC_RULE = "expected 1 to 249 of a-z A-Z 0-9 . _ -"
# Keys whose murmur2 hash is remembered (aiokafka's murmur2 is pure Python, about
# 1.5 µs a key; keys repeat: customers, devices, orders with several events).
_KEY_HASHES = 16384


def _check_topic(topic: str) -> str:
    if not _LEGAL_TOPIC.match(topic) or topic in (".", ".."):
        raise RejectedError(f"invalid Kafka topic {topic[:300]!r}: {_TOPIC_RULE}")
    return topic


def _classify(exc: BaseException) -> RetryableError | RejectedError:
    name = type(exc).__name__
    text = str(exc) or name
    if isinstance(exc, _TOO_LARGE):
        return RejectedError(f"kafka: record too large: {text}")
    if isinstance(exc, InvalidTopicError):
        return RejectedError(f"kafka: invalid topic: {text}")
    if isinstance(exc, TopicAuthorizationFailedError):
        return RejectedError(f"kafka: not authorized to write the topic: {text}")
    if name in ("InvalidRecordError", "InvalidTimestampError"):
        return RejectedError(f"kafka: broker refused the record: {text}")
    if isinstance(exc, UnknownTopicOrPartitionError):
        return RetryableError(f"kafka: unknown topic or partition (metadata refresh): {text}")
    return RetryableError(f"kafka: {name}: {text}")


@dataclass(slots=True)
class _RecordBatch:
    """One Kafka record batch of a write: its partition and the messages in it."""

    topic: str
    partition: int
    builder: BatchBuilder
    indices: list[int]


class KafkaSink(Sink[KafkaSinkConfig]):
    """Idempotent Kafka producer (acks=all); a write is record batches per partition, one wait."""

    Config = KafkaSinkConfig

    async def connect(self) -> None:
        cfg = self.config
        self._topic = AddressTemplate(cfg.topic)
        self._key = AddressTemplate(cfg.key) if cfg.key is not None else None
        self._key_hashes: dict[bytes, int] = {}
        self._turn = random.randrange(1 << 16)  # keyless: where this instance starts
        self._rebuild = False
        self._producer = await self._start_producer()

    def _new_producer(self) -> AIOKafkaProducer:
        cfg = self.config
        return AIOKafkaProducer(
            acks=cfg.acks,
            enable_idempotence=cfg.enable_idempotence,
            linger_ms=int(cfg.linger * 1000),
            max_batch_size=cfg.max_batch_size,
            max_request_size=cfg.max_request_size,
            compression_type=None if cfg.compression is Compression.none
            else cfg.compression.value,
            **client_options(cfg, self.context),
        )

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = self._new_producer()
        map_broker_addresses(producer.client, self.config)
        await start_client(producer.start, producer.stop, self.config, "producer")
        return producer

    async def _ready_producer(self) -> AIOKafkaProducer:
        if self._rebuild:
            await self._restart_producer()
        return self._producer

    async def _restart_producer(self) -> None:
        """A new producer (new producer id). After a record batch failed for good,
        an idempotent producer's sequence numbers for its partition no longer
        match the broker's, and every later batch there would fail."""
        old = self._producer
        self._rebuild = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.stop(), self.config.request_timeout)
        self._producer = await self._start_producer()
        self.context.logger.info("kafka: producer restarted")

    # --------------------------------------------------------------- writing

    async def write_batch(self, messages: Sequence[Message]) -> None:
        producer = await self._ready_producer()
        errors: dict[int, RetryableError | RejectedError] = {}
        topics = self._topics(messages, errors)
        partitions = await self._partitions(producer, {t for t in topics if t is not None},
                                            topics, errors)
        try:
            batches = self._build(producer, messages, topics, partitions, errors)
            sent = await self._submit(producer, batches, errors)
        except ProducerClosed as exc:
            raise RetryableError(f"kafka: producer closed: {exc}") from None
        if sent:
            results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
            too_large: list[tuple[int, _RecordBatch]] = []
            for (batch, _), result in zip(sent, results, strict=True):
                if not isinstance(result, BaseException):
                    continue
                if isinstance(result, _TOO_LARGE) and len(batch.indices) > 1:
                    too_large.extend((i, batch) for i in batch.indices)
                else:
                    for i in batch.indices:
                        errors[i] = self._error(result)
            idempotent = self.config.enable_idempotence
            if too_large and idempotent:
                await self._restart_producer()
            for i, batch in too_large:
                error = await self._send_alone(self._producer, messages[i], batch.topic,
                                               batch.partition)
                if error is not None:
                    errors[i] = error
                    if idempotent:
                        await self._restart_producer()
        if errors:
            if len(errors) == len(messages) and all(
                isinstance(e, RetryableError) for e in errors.values()
            ):
                raise next(iter(errors.values()))
            raise PartialWriteError(errors)

    def _topics(self, messages: Sequence[Message],
                errors: dict[int, RetryableError | RejectedError]) -> list[str | None]:
        render = self._topic.render
        if self._topic.is_constant:
            return [self.config.topic] * len(messages)
        topics: list[str | None] = []
        for i, m in enumerate(messages):
            try:
                topics.append(_check_topic(render(m)))
            except RejectedError as exc:
                errors[i] = exc
                topics.append(None)
        return topics

    async def _partitions(self, producer: AIOKafkaProducer, wanted: set[str],
                          topics: list[str | None],
                          errors: dict[int, RetryableError | RejectedError],
                          ) -> dict[str, list[int]]:
        """Each topic's partitions, sorted (the order Kafka's partitioner counts in).
        The messages of a topic that does not exist and is not created by the broker
        (auto.create.topics.enable=false) are rejected."""
        found: dict[str, list[int]] = {}
        cluster = producer.client.cluster
        for topic in wanted:
            known = cluster.partitions_for_topic(topic)
            if known:
                found[topic] = sorted(known)
                continue
            problem = await self._topic_problem(producer, topic)
            if problem is None:
                found[topic] = sorted(cluster.partitions_for_topic(topic) or ())
                if found[topic]:
                    continue
                problem = RetryableError(f"kafka: topic {topic!r} has no partitions yet")
            for i, t in enumerate(topics):
                if t == topic:
                    errors[i] = problem
        return found

    async def _topic_problem(self, producer: AIOKafkaProducer,
                             topic: str) -> RetryableError | RejectedError | None:
        cfg = self.config
        try:
            await asyncio.wait_for(producer.partitions_for(topic), cfg.metadata_timeout)
            return None
        except TopicAuthorizationFailedError as exc:
            return _classify(exc)
        except (UnknownTopicOrPartitionError, TimeoutError, KafkaTimeoutError):
            pass
        except KafkaError as exc:
            return RetryableError(f"kafka: metadata for topic {topic!r}: {exc}")
        # The topic did not appear: is it missing, or is the cluster unreachable?
        try:
            cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(),
                                             cfg.request_timeout)
        except Exception as exc:
            return RetryableError(f"kafka: cannot fetch metadata for topic {topic!r}: {exc}")
        if topic in cluster.topics():
            return RetryableError(f"kafka: topic {topic!r} has no leader yet")
        return RejectedError(f"kafka: topic {topic!r} does not exist and the broker did not "
                             f"create it within {cfg.metadata_timeout:g}s "
                             "(auto.create.topics.enable=false?)")

    def _record(self, message: Message) -> tuple[bytes | None, list[tuple[str, bytes]], int | None]:
        cfg = self.config
        if self._key is not None:
            key: bytes | None = encode_text(self._key.render(message))
        else:
            key = message.key
        headers = message.headers
        if cfg.metadata_headers:
            headers = dict(headers)
            if message.id is not None:
                headers[H_SOURCE_ID] = message.id
            if message.subject is not None:
                headers[H_SUBJECT] = message.subject
        timestamp = None
        if cfg.keep_timestamp and message.timestamp is not None:
            timestamp = int(message.timestamp * 1000)
        return key, encode_headers(headers) if headers else [], timestamp

    def _build(self, producer: AIOKafkaProducer, messages: Sequence[Message],
               topics: list[str | None], partitions: dict[str, list[int]],
               errors: dict[int, RetryableError | RejectedError]) -> list[_RecordBatch]:
        """The messages as record batches, in message order within each partition.

        A keyed record goes where Kafka's default partitioner puts its key; the
        keyless records of one write go to one partition (the next write's to the
        next), so they fill a batch instead of scattering over all partitions.
        """
        record = self._record
        hashes = self._key_hashes
        max_request = self.config.max_request_size
        estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes
        building: dict[tuple[str, int], _RecordBatch] = {}
        built: list[_RecordBatch] = []
        keyless: dict[str, int] = {}
        for i, m in enumerate(messages):
            topic = topics[i]
            if topic is None or i in errors:
                continue
            try:
                key, headers, timestamp = record(m)
            except RejectedError as exc:  # the key template lacks a part
                errors[i] = exc
                continue
            parts = partitions[topic]
            if key is not None:
                # Kafka's default partitioner (Java's and aiokafka's): positive
                # murmur2 of the key modulo the number of partitions, sorted by id.
                if type(key) is not bytes:  # a bytearray or memoryview from a transform
                    key = bytes(key)
                h = hashes.get(key)
                if h is None:
                    if len(hashes) >= _KEY_HASHES:
                        hashes.clear()
                    h = hashes[key] = murmur2(key) & 0x7FFFFFFF
                partition = parts[h % len(parts)]
            else:
                partition = keyless.get(topic, -1)
                if partition < 0:
                    partition = keyless[topic] = self._keyless_partition(producer, topic, parts)
            batch = building.get((topic, partition))
            if batch is not None:
                if batch.builder.append(key=key, value=m.data, timestamp=timestamp,
                                        headers=headers) is not None:
                    batch.indices.append(i)
                    continue
                # Full (append closed it): the record starts the partition's next batch.
                built.append(building.pop((topic, partition)))
            # The first record of a batch always fits in it: check its size here, as
            # aiokafka's send() does.
            size = estimate(key, m.data, headers)
            if size > max_request:
                errors[i] = RejectedError(
                    f"kafka: record too large: {size} bytes serialized, more than "
                    f"max_request_size ({max_request})")
                continue
            builder = producer.create_batch()
            builder.append(key=key, value=m.data, timestamp=timestamp, headers=headers)
            building[(topic, partition)] = _RecordBatch(topic, partition, builder, [i])
        for batch in building.values():
            batch.builder.close()  # complete: sent at once, without lingering
            built.append(batch)
        return built

    def _keyless_partition(self, producer: AIOKafkaProducer, topic: str,
                           parts: list[int]) -> int:
        available = producer.client.cluster.available_partitions_for_topic(topic)
        choices = sorted(available) if available else parts
        self._turn += 1
        return choices[self._turn % len(choices)]

    async def _submit(self, producer: AIOKafkaProducer, batches: list[_RecordBatch],
                      errors: dict[int, RetryableError | RejectedError],
                      ) -> list[tuple[_RecordBatch, asyncio.Future[Any]]]:
        """Hand the record batches to the producer; returns those it took, with the
        futures of their acknowledgements.

        The producer queues one batch per partition: a partition's second batch
        waits until its first is on the wire. So the first batch of every
        partition goes first, then the second ones, and so on.
        """
        if len(batches) > 1:
            rounds: dict[tuple[str, int], list[_RecordBatch]] = {}
            for batch in batches:
                rounds.setdefault((batch.topic, batch.partition), []).append(batch)
            if len(rounds) < len(batches):
                batches = [b for turn in itertools.zip_longest(*rounds.values())
                           for b in turn if b is not None]
        sent: list[tuple[_RecordBatch, asyncio.Future[Any]]] = []
        for n, batch in enumerate(batches):
            try:
                future = await producer.send_batch(batch.builder, batch.topic,
                                                   partition=batch.partition)
            except KafkaTimeoutError as exc:
                # The partition's queue did not drain in request_timeout: the cluster
                # is not taking data; the rest would wait as long.
                for rest in batches[n:]:
                    for i in rest.indices:
                        errors[i] = RetryableError(f"kafka: producer queue full: {exc}")
                break
            except ProducerClosed:
                raise
            except (KafkaError, AssertionError) as exc:
                # Refused before it was queued: no sequence number was used, unless
                # the producer itself is in a failed state.
                if type(exc).__name__ in _FATAL_NAMES or isinstance(exc, ProducerFenced):
                    self._rebuild = True
                for i in batch.indices:
                    errors[i] = _classify(exc)
                continue
            sent.append((batch, future))
        return sent

    def _error(self, exc: BaseException) -> RetryableError | RejectedError:
        error = _classify(exc)
        if type(exc).__name__ in _FATAL_NAMES or (
                isinstance(error, RejectedError) and isinstance(exc, BrokerResponseError)
                and self.config.enable_idempotence):
            self._rebuild = True  # see _restart_producer
        return error

    async def _send_alone(self, producer: AIOKafkaProducer, message: Message, topic: str,
                          partition: int) -> RetryableError | RejectedError | None:
        """Send ``message`` in a record batch of its own: it is too large only if the
        broker refuses it alone."""
        try:
            key, headers, timestamp = self._record(message)
            batch = producer.create_batch()
            batch.append(key=key, value=message.data, timestamp=timestamp, headers=headers)
            batch.close()
            future = await producer.send_batch(batch, topic, partition=partition)
            await future
        except Exception as exc:
            return self._error(exc)
        return None

    async def close(self) -> None:
        producer = getattr(self, "_producer", None)
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), self.config.request_timeout)
            except Exception as exc:
                self.context.logger.warning("kafka: closing the producer: %s", exc)
            del self._producer

