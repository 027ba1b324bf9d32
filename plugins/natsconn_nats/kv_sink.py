"""The ``nats_kv`` sink: puts, deletes and purges in a KV bucket, pipelined.

A KV put is a JetStream publish to ``$KV.<bucket>.<key>``; a delete the same
with an empty payload and ``KV-Operation: DEL``, a purge with
``KV-Operation: PURGE`` and ``Nats-Rollup: sub`` (the earlier revisions of the
key go). That is what nats-py's ``kv.put()`` sends too, one round trip per key.
Here a batch's operations are published at once by the ``jetstream`` sink's
writer, each with its own reply subject, and the batch is written when every
PubAck is in: one round trip per batch.

Optimistic concurrency: with ``expected_revision_header`` the revision a
message names is sent as ``Nats-Expected-Last-Subject-Sequence``; the server
refuses a change whose key has moved on ("wrong last sequence", code 10071),
and that message is rejected to the dead letter with the server's reason.
``Nats-Msg-Id`` (from ``Message.id``) makes a retry after a lost PubAck a
duplicate the server drops, not a second revision or a false conflict.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nats.js.errors import NotFoundError
from pydantic import Field, field_validator

from connector import (
    AddressTemplate,
    ConnectorError,
    Duration,
    Message,
    PartialWriteError,
    RejectedError,
    RetryableError,
    Sink,
    TemplateStr,
)

from .connection import NatsConnectionConfig
from .jetstream_sink import JetStreamSink, JetStreamSinkConfig
from .kv_source import OPERATION, check_bucket

EXPECTED = "Nats-Expected-Last-Subject-Sequence"
_VALID_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
_DELETE = {"KV-Operation": "DEL"}
_PURGE = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}


class KvSinkConfig(NatsConnectionConfig):
    bucket: str = Field(description="the KV bucket to write (stream KV_<bucket>)")
    key: TemplateStr = Field("{key}", description="key template: {key}, {subject}, "
                             "{subject[N]}, {header[Name]}, {id}")
    empty_is_delete: bool = Field(False, description="a message with an empty payload deletes "
                                  "its key (a Kafka tombstone), instead of putting an empty "
                                  "value")
    expected_revision_header: str | None = Field(
        None, description="header holding the revision the key must be at (0: must not "
        "exist); a conflict is rejected to the dead letter")
    dedupe: bool = Field(True, description="Nats-Msg-Id from the message id, so a retried "
                         "write adds no revision")
    ack_timeout: Duration = Field(10.0, gt=0, description="longest wait for a batch's PubAcks")
    create_bucket: bool = Field(False, description="create the bucket when it does not exist, "
                                "with history, ttl and replicas")
    history: int = Field(1, ge=1, le=64, description="revisions kept per key, when created")
    ttl: Duration | None = Field(None, description="age after which values expire, when "
                                 "created; none: never")
    replicas: int = Field(1, ge=1, le=5, description="stream replicas, when created")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        return check_bucket(value)


class _KvWriter(JetStreamSink):
    """The jetstream sink's pipelined writer, checking the bucket at connect."""

    kv: KvSinkConfig

    async def connect(self) -> None:
        await super().connect()
        cfg = self.kv
        js = self._nc.jetstream()
        try:
            info = await js.stream_info(f"KV_{cfg.bucket}")
        except NotFoundError:
            if not cfg.create_bucket:
                raise ConnectorError(
                    f"KV bucket {cfg.bucket!r} does not exist; create it, or set "
                    "`create_bucket: true`") from None
            await js.create_key_value(bucket=cfg.bucket, history=cfg.history, ttl=cfg.ttl,
                                      replicas=cfg.replicas)
            self.context.logger.info("created KV bucket %s (history %d)", cfg.bucket,
                                     cfg.history)
            return
        if (info.config.max_msgs_per_subject or 0) < 1:
            raise ConnectorError(f"stream KV_{cfg.bucket} is not a KV bucket")


class KvSink(Sink[KvSinkConfig]):
    """NATS KV puts, deletes and purges from a key template; pipelined, optimistic locking."""

    Config = KvSinkConfig

    async def connect(self) -> None:
        cfg = self.config
        self._key = AddressTemplate(cfg.key)
        self._prefix = f"$KV.{cfg.bucket}."
        connection = {name: getattr(cfg, name) for name in NatsConnectionConfig.model_fields}
        writer_config = JetStreamSinkConfig.model_validate({
            **connection, "subject": "{subject}", "dedupe": cfg.dedupe,
            "ack_timeout": cfg.ack_timeout, "stream": f"KV_{cfg.bucket}",
        })
        self._writer = _KvWriter(writer_config, self.context)
        self._writer.kv = cfg
        try:
            await self._writer.connect()
        except BaseException:
            await self._writer.close()
            raise

    def _operation(self, m: Message) -> Message:
        """The JetStream publish that carries out ``m``; RejectedError if it cannot."""
        key = self._key.render(m)
        if not _VALID_KEY.fullmatch(key) or key[0] == "." or key[-1] == ".":
            raise RejectedError(f"invalid KV key {key[:100]!r}: letters, digits and "
                                "'-/_=.' only, not starting or ending with '.'")
        op = _header(m, OPERATION)
        data = m.data
        if op is None or op == "PUT":
            if not data and self.config.empty_is_delete:
                headers: dict[str, str] = dict(_DELETE)
            else:
                headers = {}
        elif op == "DEL":
            headers, data = dict(_DELETE), b""
        elif op == "PURGE":
            headers, data = dict(_PURGE), b""
        else:
            raise RejectedError(f"unknown {OPERATION} {op[:40]!r}: expected PUT, DEL or PURGE")
        name = self.config.expected_revision_header
        if name is not None:
            expected = _header(m, name)
            if expected is not None:
                if not expected.isdigit():
                    raise RejectedError(f"header {name}: expected a revision number, found "
                                        f"{expected[:40]!r}")
                headers[EXPECTED] = expected
        return Message(data, self._prefix + key, None, headers, m.timestamp, m.id)

    async def write_batch(self, messages: Sequence[Message]) -> None:
        errors: dict[int, RetryableError | RejectedError] = {}
        ops: list[Message] = []
        where: list[int] = []  # index in `messages` of each op
        for i, m in enumerate(messages):
            try:
                ops.append(self._operation(m))
            except RejectedError as exc:
                errors[i] = exc
                continue
            where.append(i)
        if ops:
            try:
                await self._writer.write_batch(ops)
            except PartialWriteError as exc:
                for j, error in exc.failed.items():
                    errors[where[j]] = error
            except RetryableError as exc:
                if not errors:
                    raise
                for i in where:
                    errors[i] = exc
            except RejectedError as exc:
                for i in where:
                    errors[i] = exc
        if errors:
            if len(errors) == len(messages) and all(
                isinstance(e, RetryableError) for e in errors.values()
            ):
                raise next(iter(errors.values()))
            raise PartialWriteError(errors)

    async def close(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None:
            await writer.close()


def _header(m: Message, name: str) -> str | None:
    value = m.headers.get(name)
    if value is not None or not m.headers:
        return value
    lowered = name.lower()
    for key, val in m.headers.items():
        if key.lower() == lowered:
            return val
    return None
