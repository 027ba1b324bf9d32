"""The ``nats_object`` sink, and what it shares with the claim-check transforms.

Objects are written with nats-py's object store API (``ObjectStore.put``): the
payload goes out in chunks of ``chunk_size`` bytes on ``$O.<bucket>.C.<nuid>``,
each a JetStream publish with its PubAck, then one meta message on
``$O.<bucket>.M.<name>`` (a rollup, so only the latest meta of a name stays);
the chunks of the object it replaced are purged. An object may be much larger
than the server's ``max_payload``; only a chunk must fit.

Names are deterministic: from a template, else the message id, else the
SHA-256 of the payload, so a redelivered message overwrites its object instead
of adding one. The objects of one batch are written ``concurrency`` at a time,
those of one name in order (the last one wins, as it would one at a time).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import nats.errors
from nats.js import api
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore
from pydantic import Field, field_validator

from connector import (
    AddressTemplate,
    ByteSize,
    ConnectorError,
    Duration,
    Message,
    PartialWriteError,
    PluginContext,
    RejectedError,
    RetryableError,
    Sink,
    TemplateStr,
)

from .connection import Client, NatsConnectionConfig, nats_error, open_connection
from .kv_source import check_bucket

DIGEST_PREFIX = "SHA-256="
_TOO_LARGE = {10054}  # message size exceeds maximum allowed


class ObjectBucketConfig(NatsConnectionConfig):
    """Options of a plugin that writes objects into one bucket."""

    bucket: str = Field(description="the object store bucket (stream OBJ_<bucket>)")
    name: TemplateStr | None = Field(
        None, description="object name template ({id}, {key}, {subject}, {header[Name]}); "
        "default: the message id, else sha256-<hex of the payload>")
    create_bucket: bool = Field(False, description="create the bucket when it does not "
                                "exist, with ttl, max_bytes and replicas")
    ttl: Duration | None = Field(None, description="age after which objects expire, when "
                                 "created; none: never")
    max_bytes: ByteSize | None = Field(None, description="bucket size limit, when created")
    replicas: int = Field(1, ge=1, le=5, description="stream replicas, when created")
    chunk_size: ByteSize = Field(128 * 1024, ge=1024, description="bytes per chunk message; "
                                 "at most the server's max_payload")
    concurrency: int = Field(8, ge=1, le=256, description="objects written at once")
    timeout: Duration = Field(60.0, gt=0, description="longest time for one object")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        return check_bucket(value)


def digest_of(data: bytes) -> str:
    """The object store's own digest format: ``SHA-256=`` and URL-safe base64."""
    return DIGEST_PREFIX + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


class ObjectName:
    """Deterministic object names: the template, else the id, else the payload's hash."""

    __slots__ = ("_template",)

    def __init__(self, template: str | None) -> None:
        self._template = AddressTemplate(template) if template is not None else None

    def __call__(self, message: Message) -> str:
        if self._template is not None:
            name = self._template.render(message)
        elif message.id is not None:
            name = message.id
        else:
            name = "sha256-" + hashlib.sha256(message.data).hexdigest()
        if not name or name != name.strip() or "\r" in name or "\n" in name:
            raise RejectedError(f"object name {name[:100]!r}: empty, or with line breaks or "
                                "surrounding whitespace")
        return name


async def open_bucket(nc: Client, cfg: ObjectBucketConfig, context: PluginContext
                      ) -> ObjectStore:
    """The bucket, created when missing and ``create_bucket`` is set."""
    js = nc.jetstream()
    try:
        return await js.object_store(cfg.bucket)
    except BucketNotFoundError:
        if not cfg.create_bucket:
            raise ConnectorError(f"object store bucket {cfg.bucket!r} does not exist; create "
                                 "it, or set `create_bucket: true`") from None
    params: dict[str, Any] = {"replicas": cfg.replicas}
    if cfg.ttl is not None:
        params["ttl"] = cfg.ttl
    if cfg.max_bytes is not None:
        params["max_bytes"] = cfg.max_bytes
    store = await js.create_object_store(cfg.bucket, **params)
    context.logger.info("created object store bucket %s", cfg.bucket)
    return store


def chunk_size(cfg: ObjectBucketConfig, nc: Client) -> int:
    """``chunk_size``, made to fit the server's max_payload with room for headers."""
    return max(1024, min(cfg.chunk_size, nc.max_payload - 4096))


async def connect_bucket(cfg: ObjectBucketConfig, context: PluginContext
                         ) -> tuple[Client, ObjectStore, int]:
    """A connection, the bucket and the chunk size: what the sink and claim_check_put
    open. The connection is closed again if the bucket cannot be had."""
    nc: Client = await open_connection(cfg, context)
    try:
        store = await open_bucket(nc, cfg, context)
    except ConnectorError:
        await nc.close()
        raise
    except Exception as exc:
        await nc.close()
        raise RetryableError(f"object store bucket {cfg.bucket!r}: {exc}") from None
    return nc, store, chunk_size(cfg, nc)


async def put_object(store: ObjectStore, name: str, data: bytes, chunk: int,
                     headers: Mapping[str, str] | None, timeout: float) -> None:
    """One object, chunked by nats-py; errors as the engine's kinds."""
    meta = api.ObjectMeta(name=name, options=api.ObjectMetaOptions(max_chunk_size=chunk))
    if headers:
        # As nats.go stores them (nats.Header): each name with a list of values.
        meta.headers = {k: [v] for k, v in headers.items()}
    try:
        await asyncio.wait_for(store.put(name, data, meta=meta), timeout)
    except TimeoutError:
        raise RetryableError(f"object {name!r}: not stored within {timeout:g}s") from None
    except APIError as exc:
        if exc.err_code in _TOO_LARGE:
            raise RejectedError(f"object {name!r}: {exc}") from None
        raise RetryableError(f"object {name!r}: {exc}") from None
    except (nats.errors.Error, OSError) as exc:
        raise nats_error(exc) from exc


async def get_object(store: ObjectStore, name: str, timeout: float) -> tuple[bytes, Any]:
    """(payload, info) of one object; RejectedError if it does not exist. nats-py
    checks the chunks against the object's digest (DigestMismatchError)."""
    out = io.BytesIO()  # not nats-py's default of `bytes +=` per chunk (quadratic)
    try:
        result = await asyncio.wait_for(store.get(name, writeinto=out), timeout)
    except TimeoutError:
        raise RetryableError(f"object {name!r}: not read within {timeout:g}s") from None
    except NotFoundError:  # ObjectNotFoundError too
        raise RejectedError(f"object {name!r} not found in bucket "
                            f"{store._name!r}") from None
    except nats.js.errors.DigestMismatchError:
        raise RejectedError(f"object {name!r}: its chunks do not match its digest") from None
    except (nats.errors.Error, OSError) as exc:
        raise nats_error(exc) from exc
    data = out.getvalue() if result.info.size else b""
    return data, result.info


async def run_by_name(
    names: Sequence[str | None], work: Callable[[int], Awaitable[None]], concurrency: int,
) -> dict[int, RetryableError | RejectedError]:
    """Run ``work(i)`` for every index with a name, ``concurrency`` at a time; the
    indices of one name one after the other, in order. Returns the failures."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(i)
    errors: dict[int, RetryableError | RejectedError] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one_name(indices: list[int]) -> None:
        for i in indices:
            async with gate:
                try:
                    await work(i)
                except (RetryableError, RejectedError) as exc:
                    errors[i] = exc

    await asyncio.gather(*(one_name(g) for g in groups.values()))
    return errors


class ObjectSink(Sink[ObjectBucketConfig]):
    """NATS Object Store: each message one object, named from a template or its id."""

    Config = ObjectBucketConfig

    async def connect(self) -> None:
        self._names = ObjectName(self.config.name)
        self._nc, self._store, self._chunk = await connect_bucket(self.config, self.context)

    async def write_batch(self, messages: Sequence[Message]) -> None:
        cfg = self.config
        errors: dict[int, RetryableError | RejectedError] = {}
        names: list[str | None] = []
        for i, m in enumerate(messages):
            try:
                names.append(self._names(m))
            except RejectedError as exc:
                errors[i] = exc
                names.append(None)

        async def put(i: int) -> None:
            m = messages[i]
            await put_object(self._store, names[i] or "", m.data, self._chunk, m.headers,
                             cfg.timeout)

        errors.update(await run_by_name(names, put, cfg.concurrency))
        if errors:
            if len(errors) == len(messages) and all(
                isinstance(e, RetryableError) for e in errors.values()
            ):
                raise next(iter(errors.values()))
            raise PartialWriteError(errors)

    async def close(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is not None:
            await nc.close()
