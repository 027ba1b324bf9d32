"""The ``nats_kv`` source: a KV bucket's changes, resumable across restarts.

A KV bucket is the JetStream stream ``KV_<bucket>``; each put, delete and
purge is one message on ``$KV.<bucket>.<key>``, its stream sequence being the
key's revision. nats-py's ``watch()`` reads that stream through an ordered,
ephemeral consumer that acknowledges nothing: after a restart it starts again
from the beginning or from now. This source reads the stream through a
*durable* pull consumer instead (the ``jetstream`` source's reader: prefetch,
one long-lived inbox, ``+ACK`` after the sink confirmed), filtered on the
watched keys, so a restart continues at the first revision the sink had not
confirmed.

Each change becomes one message: ``key`` and ``subject`` the KV key, headers
``KV-Operation`` (``PUT``, ``DEL`` or ``PURGE``), ``KV-Revision`` and
``KV-Bucket``, ``id`` ``<bucket>:<revision>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nats.js.errors import NotFoundError
from pydantic import Field, field_validator, model_validator

from connector import Batch, ByteSize, ConnectorError, Duration, Message, Source

from .connection import NatsConnectionConfig
from .jetstream_source import DeliverPolicy, JetStreamSource, JetStreamSourceConfig

OPERATION = "KV-Operation"
REVISION = "KV-Revision"
BUCKET = "KV-Bucket"
_MARKER = "Nats-Marker-Reason"  # server-written delete markers (TTL, purge) since 2.11
_MARKER_OPS = {"MaxAge": "PURGE", "Purge": "PURGE", "Remove": "DEL"}

VALID_BUCKET = re.compile(r"^[a-zA-Z0-9_-]+$")
_KEY_FILTER = re.compile(r"^[-/_=.a-zA-Z0-9*>]+$")


def check_bucket(value: str) -> str:
    if not VALID_BUCKET.fullmatch(value):
        raise ValueError(f"expected a bucket name of letters, digits, '-' and '_', found "
                         f"{value!r}")
    return value


class KvSourceConfig(NatsConnectionConfig):
    bucket: str = Field(description="the KV bucket to watch (stream KV_<bucket>)")
    keys: list[str] = Field(default_factory=lambda: [">"], min_length=1, description=
                            "keys to watch; NATS wildcards: '*' one token, '>' the rest")
    include_history: bool = Field(False, description="start with every revision the bucket "
                                  "keeps, not only the latest of each key")
    updates_only: bool = Field(False, description="start with changes made after the first "
                               "start, not the bucket's present values")
    durable: str | None = Field(None, description="durable consumer name, shared by replicas; "
                                "default natsconn-<pipeline>")
    ack_wait: Duration = Field(30.0, description="redelivery after this without an ack")
    max_ack_pending: int = Field(20_000, ge=1)
    prefetch: int = Field(10_000, ge=1, description="changes requested ahead of reads, at most")
    prefetch_bytes: ByteSize = Field(16 * 1024 * 1024, description="about how many value bytes "
                                     "may be requested ahead of reads")
    pull_expires: Duration = Field(2.0, gt=0.1, description="lifetime of one pull request")
    domain: str | None = Field(None, description="JetStream domain")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        return check_bucket(value)

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for key in value:
            tokens = key.split(".")
            if not _KEY_FILTER.fullmatch(key) or any(
                not t or (("*" in t or ">" in t) and t not in ("*", ">")) for t in tokens
            ) or ">" in tokens[:-1]:
                raise ValueError(f"expected a key or a key filter such as 'orders.*' or "
                                 f"'orders.>', found {key!r}")
        return value

    @model_validator(mode="after")
    def _start(self) -> KvSourceConfig:
        if self.include_history and self.updates_only:
            raise ValueError("include_history and updates_only exclude each other")
        return self


class _KvStream(JetStreamSource):
    """The jetstream source on a KV bucket's stream, with KV-shaped errors."""

    bucket = ""

    async def _ensure_stream(self, js: Any) -> None:
        try:
            info = await js.stream_info(self.config.stream)
        except NotFoundError:
            raise ConnectorError(
                f"KV bucket {self.bucket!r} does not exist (no stream "
                f"{self.config.stream!r}); create it, e.g. `nats kv add {self.bucket}`"
            ) from None
        if (info.config.max_msgs_per_subject or 0) < 1:
            raise ConnectorError(f"stream {self.config.stream!r} is not a KV bucket "
                                 "(no max_msgs_per_subject)")


class KvSource(Source[KvSourceConfig]):
    """NATS KV bucket changes (puts, deletes, purges) from a durable consumer; resumable."""

    Config = KvSourceConfig

    def _stream_config(self) -> JetStreamSourceConfig:
        cfg = self.config
        connection = {name: getattr(cfg, name) for name in NatsConnectionConfig.model_fields}
        if cfg.include_history:
            policy = DeliverPolicy.all
        elif cfg.updates_only:
            policy = DeliverPolicy.new
        else:
            policy = DeliverPolicy.last_per_subject
        prefix = f"$KV.{cfg.bucket}."
        return JetStreamSourceConfig.model_validate({
            **connection,
            "stream": f"KV_{cfg.bucket}",
            "durable": cfg.durable or f"natsconn-{self.context.pipeline}",
            "filter_subjects": [prefix + k for k in cfg.keys],
            "deliver_policy": policy,
            "ack_wait": cfg.ack_wait,
            "max_ack_pending": cfg.max_ack_pending,
            "prefetch": cfg.prefetch,
            "prefetch_bytes": cfg.prefetch_bytes,
            "pull_expires": cfg.pull_expires,
            "domain": cfg.domain,
        })

    async def connect(self) -> None:
        cfg = self.config
        self._prefix_len = len(f"$KV.{cfg.bucket}.")
        self._stream = _KvStream(self._stream_config(), self.context)
        self._stream.bucket = cfg.bucket
        try:
            await self._stream.connect()
        except BaseException:
            await self._stream.close()
            raise

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        batch = await self._stream.read_batch(max_messages, max_wait)
        if batch is None:
            return None
        bucket = self.config.bucket
        cut = self._prefix_len
        out = []
        for m in batch.messages:
            key = (m.subject or "")[cut:]
            revision = (m.id or "").rpartition(":")[2]
            out.append(Message(m.data, key, key.encode(), _headers(m.headers, revision, bucket),
                               m.timestamp, f"{bucket}:{revision}"))
        return Batch(out, batch.ack)

    async def close(self) -> None:
        stream = getattr(self, "_stream", None)
        if stream is not None:
            await stream.close()


def _headers(stored: Mapping[str, str], revision: str, bucket: str) -> dict[str, str]:
    """The change's headers: what the writer set (without the server's own
    ``Nats-*`` control headers), and the operation, revision and bucket."""
    op = "PUT"
    out: dict[str, str] = {}
    for name, value in stored.items():
        if name == OPERATION:
            op = value
        elif name == _MARKER:
            op = _MARKER_OPS.get(value, "PURGE")
        elif not name.startswith("Nats-"):
            out[name] = value
    out[OPERATION] = op
    out[REVISION] = revision
    out[BUCKET] = bucket
    return out
