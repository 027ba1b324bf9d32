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

import asyncio
import re
from collections.abc import Mapping
from typing import Any

from nats.js import api
from nats.js.errors import NotFoundError
from pydantic import Field, field_validator, model_validator

from connector import Batch, ByteSize, ConnectorError, Duration, Message, PluginConfig, Source

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
    durable: str | None = Field(None, description="durable consumer name; its ack floor is "
                                "where a restart goes on; default natsconn-<pipeline>")
    ack_wait: Duration = Field(30.0, description="redelivery after this without an ack")
    max_ack_pending: int = Field(20_000, ge=1)
    prefetch: int = Field(10_000, ge=1, description="changes requested ahead of reads, at most")
    prefetch_bytes: ByteSize = Field(16 * 1024 * 1024, description="about how many value bytes "
                                     "may be requested ahead of reads")
    pull_expires: Duration = Field(2.0, gt=0.1, description="lifetime of one pull request")
    domain: str | None = Field(None, description="JetStream domain")
    resume_in_order: bool = Field(True, description="after a crash, read the revisions the "
                                  "earlier reader never confirmed again, in order, before "
                                  "newer ones (recreates the durable after its ack floor)")

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
    """The jetstream source on a KV bucket's stream, with KV-shaped errors, and a
    durable that resumes in order (see ``_ensure_consumer``)."""

    bucket = ""
    resume_in_order = True

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

    async def _ensure_consumer(self, js: Any) -> None:
        """Create the durable, or bind it and resume after the last confirmed revision.

        A durable consumer redelivers what an earlier reader took and never
        acknowledged only once ``ack_wait`` has run out, and meanwhile hands out
        newer revisions: after a crash a key's older value could overtake its
        newer one (or a delete). So when the durable has such deliveries and no
        other reader waits on it (no open pull request once the dead one's have
        expired), it is created again starting right after its ack floor: every
        unconfirmed revision comes again, in order, before anything newer.
        Revisions confirmed beyond the floor come again too (at least once)."""
        cfg = self.config
        try:
            info = await js.consumer_info(cfg.stream, self._durable)
        except NotFoundError:
            await self._create(js, api.DeliverPolicy(cfg.deliver_policy.value), None)
            return
        have = sorted(info.config.filter_subjects or (
            [info.config.filter_subject] if info.config.filter_subject else []))
        if have != sorted(cfg.filter_subjects):
            raise ConnectorError(
                f"durable {self._durable!r} on bucket {self.bucket!r} watches {have}, not "
                f"{sorted(cfg.filter_subjects)}; give another durable, or delete this one "
                f"(nats consumer rm {cfg.stream} {self._durable})")
        if self.resume_in_order and info.num_ack_pending:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + cfg.pull_expires + 2.0
            while info.num_waiting and loop.time() < deadline:
                await asyncio.sleep(0.2)
                info = await js.consumer_info(cfg.stream, self._durable)
            if info.num_waiting:
                self.context.logger.warning(
                    "KV bucket %s: another reader is active on durable %s; not resuming "
                    "in order (%d revisions unconfirmed), per-key order may not hold",
                    self.bucket, self._durable, info.num_ack_pending)
            elif info.num_ack_pending:
                await self._restart_after_floor(js, info)
                return
        config = info.config  # keep its start; apply what may change
        config.ack_wait = cfg.ack_wait
        config.max_ack_pending = cfg.max_ack_pending
        try:
            await js.add_consumer(cfg.stream, config)
        except Exception as exc:
            raise ConnectorError(f"cannot bind consumer {self._durable!r} on bucket "
                                 f"{self.bucket!r}: {exc}") from None

    async def _restart_after_floor(self, js: Any, info: Any) -> None:
        cfg = self.config
        created = info.config
        if info.ack_floor is not None and info.ack_floor.consumer_seq:
            floor = int(info.ack_floor.stream_seq or 0)
        elif created.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE:
            floor = int(created.opt_start_seq or 1) - 1  # nothing confirmed since its start
        else:
            floor = 0
        self.context.logger.info(
            "KV bucket %s: %d revisions were delivered to an earlier reader and never "
            "confirmed; reading again after revision %d, in order", self.bucket,
            info.num_ack_pending, floor)
        await js.delete_consumer(cfg.stream, self._durable)
        if floor == 0:  # nothing confirmed yet: start as the durable first did
            await self._create(js, created.deliver_policy, None)
        else:
            await self._create(js, api.DeliverPolicy.BY_START_SEQUENCE, floor + 1)

    async def _create(self, js: Any, policy: api.DeliverPolicy, start: int | None) -> None:
        cfg = self.config
        if policy == api.DeliverPolicy.NEW:
            # Recorded as a start sequence, so that a restart before the first
            # confirmation knows where "new" began.
            info = await js.stream_info(cfg.stream)
            policy, start = api.DeliverPolicy.BY_START_SEQUENCE, int(info.state.last_seq) + 1
        config = api.ConsumerConfig(
            name=self._durable, durable_name=self._durable,
            ack_policy=api.AckPolicy.EXPLICIT, ack_wait=cfg.ack_wait,
            max_ack_pending=cfg.max_ack_pending, max_deliver=cfg.max_deliver,
            deliver_policy=policy, opt_start_seq=start,
            filter_subjects=cfg.filter_subjects, max_waiting=512)
        try:
            await js.add_consumer(cfg.stream, config)
        except Exception as exc:
            raise ConnectorError(f"cannot create consumer {self._durable!r} on bucket "
                                 f"{self.bucket!r}: {exc}") from None


class KvSource(Source[KvSourceConfig]):
    """NATS KV bucket changes (puts, deletes, purges) from a durable consumer; resumable."""

    Config = KvSourceConfig

    @classmethod
    def shareable(cls, config: PluginConfig) -> bool:
        """No: replicas on one durable would break the per-key order of the changes
        (and resume_in_order resets the consumer), so under --workers it runs in
        worker 0 only."""
        return False

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
        self._stream.resume_in_order = cfg.resume_in_order
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
