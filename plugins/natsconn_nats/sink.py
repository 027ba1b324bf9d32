"""The ``nats`` sink: core NATS publish, flushed per batch.

A flush that times out on a connection that stays up leaves the batch queued in
the client; its retry then only waits for a new flush (see :mod:`.queued`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from nats.errors import BadHeaderError, BadSubjectError, FlushTimeoutError
from pydantic import Field

from connector import (
    AddressTemplate,
    Duration,
    Message,
    PartialWriteError,
    RejectedError,
    RetryableError,
    Sink,
    TemplateStr,
)

from .connection import Client, NatsConnectionConfig, encode_publish, nats_error, open_connection
from .queued import QueuedWrites


class NatsSinkConfig(NatsConnectionConfig):
    subject: TemplateStr = Field("{subject}", description="subject template: {subject}, "
                         "{subject[N]}, {header[Name]}, {key}, {id}")
    flush_timeout: Duration = Field(10.0, gt=0, description="longest wait for the server "
                                    "to confirm a batch (PING/PONG)")


class NatsSink(Sink[NatsSinkConfig]):
    """Core NATS publish; a batch counts as written when the server has it."""

    Config = NatsSinkConfig

    async def connect(self) -> None:
        self._template = AddressTemplate(self.config.subject)
        # Resolved, and replaced, at each reconnect (see _flush).
        self._reconnect: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued = QueuedWrites()
        self._writes = 0  # numbers each flush, after the data it confirms was queued
        self._nc: Client = await open_connection(self.config, self.context, self._on_reconnect)

    async def _on_reconnect(self) -> None:
        done, self._reconnect = self._reconnect, asyncio.get_running_loop().create_future()
        self._queued.connection_lost()
        done.set_result(None)

    async def _flush(self, reconnect: asyncio.Future[None]) -> None:
        """``nc.flush()``, but give up as soon as the connection was replaced.

        nats-py forgets the PING of a flush when it reconnects, so that flush
        only ends at its timeout; and what went to the lost connection is gone.
        """
        timeout = self.config.flush_timeout
        flush = asyncio.ensure_future(self._nc.flush(timeout=timeout))  # type: ignore[arg-type]
        try:
            await asyncio.wait((flush, reconnect), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            flush.cancel()
            raise
        if flush.done():
            flush.result()  # flushed, or the flush's own error
            return
        flush.cancel()
        raise RetryableError("nats: the connection was lost during the write (reconnected)")

    async def write_batch(self, messages: Sequence[Message]) -> None:
        nc = self._nc
        render = self._template.render
        max_payload = nc.max_payload
        rejected: dict[int, RejectedError] = {}
        try:
            if nc.is_reconnecting:  # publish on the new connection, not into a lost one
                try:
                    await asyncio.wait_for(asyncio.shield(self._reconnect),
                                           self.config.flush_timeout)
                except TimeoutError:
                    raise RetryableError("nats: not connected (reconnecting)") from None
            reconnect = self._reconnect
            queued = self._queued
            # Looked up once a batch: nothing per message unless a stall left some.
            held = queued.held if len(queued) else None
            commands: list[bytes] = []
            nbytes = 0
            for i, m in enumerate(messages):
                if held is not None and held(m):
                    continue  # queued or delivered by an earlier attempt
                subject = ""
                try:
                    subject = render(m)
                    if len(m.data) > max_payload:
                        raise RejectedError(
                            f"payload of {len(m.data)} bytes exceeds the server's "
                            f"max_payload {max_payload}")
                    commands.append(encode_publish(subject, m.data, m.headers))
                    nbytes += len(m.data)
                except RejectedError as exc:
                    rejected[i] = exc
                except BadSubjectError:
                    rejected[i] = RejectedError(f"invalid NATS subject {subject!r}")
                except (BadHeaderError, UnicodeError) as exc:
                    rejected[i] = RejectedError(f"header NATS cannot carry: {exc}")
            if commands:
                await nc.send_encoded(commands, len(commands), nbytes)
            self._writes += 1
            write = self._writes
            try:
                await self._flush(reconnect)
            except FlushTimeoutError:
                if not reconnect.done():  # same connection: the bytes are still queued
                    queued.timed_out(messages, write, skip=rejected)
                raise
            queued.flushed(messages, write)
        except RetryableError:
            raise
        except Exception as exc:
            raise nats_error(exc) from exc
        if rejected:
            raise PartialWriteError(rejected)

    async def close(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is not None and not nc.is_closed:
            try:
                if nc.is_connected:
                    await nc.flush(timeout=5)
            finally:
                await nc.close()
