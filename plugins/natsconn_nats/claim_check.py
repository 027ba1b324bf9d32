"""The claim-check transforms: large payloads parked in a NATS Object Store.

``claim_check_put`` stores every payload larger than ``threshold`` bytes as an
object and lets the message go on with an empty payload and three headers::

    Natsconn-Claim-Check: <bucket>/<object name>
    Natsconn-Claim-Check-Size: <bytes>
    Natsconn-Claim-Check-Digest: SHA-256=<url-safe base64>

``claim_check_get`` puts the payload back and removes the headers; the object
must have exactly that size and digest. So a 10 MiB Kafka record can cross a
NATS server whose ``max_payload`` is 1 MiB: the object store chunks it.

The object is stored before the message goes on, so the reference never
points at nothing (at least once: a redelivered message stores its object
again under the same deterministic name, overwriting it). Objects are not
deleted on restore, since a redelivery may need them again: give the bucket a
``ttl`` longer than the longest time a message may take from put to get.

Failures: a store or fetch the server does not answer is retried within
``timeout``; after that the transform raises a retryable error and the engine
gives the source batch back (redelivered). An object that does not exist, or
has the wrong size or digest, rejects that message to the dead letter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from nats.js.errors import BucketNotFoundError
from nats.js.object_store import ObjectStore
from pydantic import Field, field_validator

from connector import (
    ByteSize,
    Duration,
    Message,
    Rejected,
    RejectedError,
    RetryableError,
    Transform,
)

from .connection import Client, NatsConnectionConfig, open_connection
from .kv_source import check_bucket
from .object_store import (
    ObjectBucketConfig,
    ObjectName,
    connect_bucket,
    digest_of,
    get_object,
    put_object,
    run_by_name,
)

CLAIM = "Natsconn-Claim-Check"
CLAIM_SIZE = "Natsconn-Claim-Check-Size"
CLAIM_DIGEST = "Natsconn-Claim-Check-Digest"
_CLAIM_HEADERS = (CLAIM, CLAIM_SIZE, CLAIM_DIGEST)
_RETRY_PAUSE = 0.5
T = TypeVar("T")


class ClaimCheckPutConfig(ObjectBucketConfig):
    threshold: ByteSize = Field(512 * 1024, ge=0, description="payloads larger than this are "
                                "stored as objects; keep it below the server's max_payload "
                                "minus the headers")
    timeout: Duration = Field(60.0, gt=0, description="how long a store is retried before "
                              "the batch fails (and is redelivered)")


class ClaimCheckGetConfig(NatsConnectionConfig):
    bucket: str | None = Field(None, description="only restore references to this bucket "
                               "(others are rejected); default: any bucket")
    timeout: Duration = Field(60.0, gt=0, description="how long a fetch is retried before "
                              "the batch fails (and is redelivered)")
    concurrency: int = Field(8, ge=1, le=256, description="objects fetched at once")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        return check_bucket(value) if value is not None else None


class ClaimCheckPut(Transform[ClaimCheckPutConfig]):
    """Store payloads above `threshold` in a NATS Object Store; pass a reference header."""

    Config = ClaimCheckPutConfig

    async def connect(self) -> None:
        self._names = ObjectName(self.config.name)
        self._nc, self._store, self._chunk = await connect_bucket(self.config, self.context)

    async def process(self, messages: list[Message]) -> Sequence[Message | Rejected]:
        cfg = self.config
        out: list[Message | Rejected | None] = list(messages)
        names: list[str | None] = [None] * len(messages)
        for i, m in enumerate(messages):
            if len(m.data) <= cfg.threshold or _get(m.headers, CLAIM) is not None:
                continue
            try:
                names[i] = self._names(m)
            except RejectedError as exc:
                out[i] = Rejected(m, str(exc))
        if any(n is not None for n in names):
            deadline = time.monotonic() + cfg.timeout

            async def put(i: int) -> None:
                m = messages[i]
                await _with_retries(deadline, lambda: put_object(
                    self._store, names[i] or "", m.data, self._chunk, None, cfg.timeout))

            failed = await run_by_name(names, put, cfg.concurrency)
            for i, name in enumerate(names):
                if name is None:
                    continue
                m = messages[i]
                error = failed.get(i)
                if isinstance(error, RetryableError):
                    raise RetryableError(f"claim check: {error}")
                if error is not None:
                    out[i] = Rejected(m, f"claim check: {error}")
                    continue
                headers = dict(m.headers)
                headers[CLAIM] = f"{cfg.bucket}/{name}"
                headers[CLAIM_SIZE] = str(len(m.data))
                headers[CLAIM_DIGEST] = digest_of(m.data)
                out[i] = Message(b"", m.subject, m.key, headers, m.timestamp, m.id)
        return [o for o in out if o is not None]

    async def close(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is not None:
            await nc.close()


class ClaimCheckGet(Transform[ClaimCheckGetConfig]):
    """Restore payloads that claim_check_put stored, checking size and digest."""

    Config = ClaimCheckGetConfig

    async def connect(self) -> None:
        self._nc: Client = await open_connection(self.config, self.context)
        self._stores: dict[str, ObjectStore] = {}

    async def _store(self, bucket: str) -> ObjectStore:
        store = self._stores.get(bucket)
        if store is None:
            try:
                store = await self._nc.jetstream().object_store(bucket)
            except BucketNotFoundError:
                raise RejectedError(f"object store bucket {bucket!r} does not exist") from None
            except Exception as exc:
                raise RetryableError(f"object store bucket {bucket!r}: {exc}") from None
            self._stores[bucket] = store
        return store

    async def process(self, messages: list[Message]) -> Sequence[Message | Rejected]:
        cfg = self.config
        out: list[Message | Rejected] = list(messages)
        refs: list[str | None] = [None] * len(messages)
        for i, m in enumerate(messages):
            ref = _get(m.headers, CLAIM)
            if ref is None:
                continue
            bucket, _, name = ref.partition("/")
            if not bucket or not name:
                out[i] = Rejected(m, f"claim check: reference {ref[:100]!r} is not "
                                  "<bucket>/<object name>")
            elif cfg.bucket is not None and bucket != cfg.bucket:
                out[i] = Rejected(m, f"claim check: reference to bucket {bucket!r}; only "
                                  f"{cfg.bucket!r} is allowed")
            else:
                refs[i] = ref
        if any(r is not None for r in refs):
            deadline = time.monotonic() + cfg.timeout

            async def get(i: int) -> None:
                out[i] = await _with_retries(deadline, lambda: self._restore(messages[i]))

            failed = await run_by_name(refs, get, cfg.concurrency)
            for i, error in sorted(failed.items()):
                if isinstance(error, RetryableError):
                    raise RetryableError(f"claim check: {error}")
                out[i] = Rejected(messages[i], f"claim check: {error}")
        return out

    async def _restore(self, m: Message) -> Message:
        ref = _get(m.headers, CLAIM) or ""
        bucket, _, name = ref.partition("/")
        store = await self._store(bucket)
        data, _info = await get_object(store, name, self.config.timeout)
        size = _get(m.headers, CLAIM_SIZE)
        if size is not None and size != str(len(data)):
            raise RejectedError(f"object {ref!r} has {len(data)} bytes, the reference says "
                                f"{size}")
        digest = _get(m.headers, CLAIM_DIGEST)
        if digest is not None and digest != digest_of(data):
            raise RejectedError(f"object {ref!r} does not match the reference's digest "
                                f"{digest}")
        lowered = {h.lower() for h in _CLAIM_HEADERS}
        headers = {k: v for k, v in m.headers.items() if k.lower() not in lowered}
        return Message(data, m.subject, m.key, headers, m.timestamp, m.id)

    async def close(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is not None:
            await nc.close()


async def _with_retries(deadline: float, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` again after a retryable failure, until ``deadline``."""
    while True:
        try:
            return await call()
        except RetryableError:
            if time.monotonic() + _RETRY_PAUSE >= deadline:
                raise
        await asyncio.sleep(_RETRY_PAUSE)


def _get(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None or not headers:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None
