"""The ``jetstream`` sink: pipelined publishes, PubAcks collected per batch.

Every message of a batch is published at once with its own reply subject on
one long-lived inbox; the batch is written when every PubAck is in. That is
one round trip per batch, not per message. ``Nats-Msg-Id`` from
``Message.id`` lets the stream drop the duplicates that a retry or a crash
would otherwise add (within the stream's duplicate window).

When PubAcks time out on a connection that stays up, the server may simply
not be reading (a stalled connection): the publishes are still queued in the
client. Publishing again would pile a copy of the batch into the client's
buffer at every retry round, so after such a timeout the next write first
asks for a PONG, and publishes only once the connection moves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Sequence

from nats.aio.subscription import Subscription
from nats.errors import BadHeaderError, BadSubjectError, FlushTimeoutError
from nats.js.errors import NotFoundError
from pydantic import Field

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

from .connection import Client, NatsConnectionConfig, encode_publish, nats_error, open_connection

MSG_ID = "Nats-Msg-Id"
# JetStream API error codes that no retry can cure.
_POISON_CODES = {
    10054,  # message size exceeds maximum allowed
    10071,  # wrong last sequence
    10070,  # wrong last msg id
    10060,  # expected stream does not match
}


class JetStreamSinkConfig(NatsConnectionConfig):
    subject: TemplateStr = Field("{subject}", description="subject template: {subject}, "
                         "{subject[N]}, {header[Name]}, {key}, {id}")
    dedupe: bool = Field(True, description="set Nats-Msg-Id from the message id so the "
                         "stream drops redelivered duplicates")
    ack_timeout: Duration = Field(10.0, gt=0, description="longest wait for a batch's PubAcks")
    stream: str | None = Field(None, description="expected stream (Nats-Expected-Stream); "
                               "with stream_subjects, created if missing")
    stream_subjects: list[str] | None = Field(None, description="create `stream` with these "
                                              "subjects if it does not exist")


class _InFlight:
    __slots__ = ("done", "errors", "lost", "remaining", "seen", "subjects")

    def __init__(self, n: int) -> None:
        self.subjects: list[str] = []  # as published, by index, for error messages
        self.remaining = n
        self.seen = bytearray(n)
        self.errors: dict[int, RetryableError | RejectedError] = {}
        self.done = asyncio.get_running_loop().create_future()
        self.lost = False  # the connection dropped before every PubAck came


class JetStreamSink(Sink[JetStreamSinkConfig]):
    """JetStream publish with PubAck, pipelined per batch, deduplicated by message id."""

    Config = JetStreamSinkConfig

    async def connect(self) -> None:
        cfg = self.config
        self._template = AddressTemplate(cfg.subject)
        self._batches: dict[str, _InFlight] = {}
        # PubAcks timed out on the current connection: see the module docstring.
        self._unanswered = False
        self._nc: Client = await open_connection(cfg, self.context,
                                                 disconnected=self._on_disconnect)
        if cfg.stream and cfg.stream_subjects:
            js = self._nc.jetstream()
            try:
                await js.stream_info(cfg.stream)
            except NotFoundError:
                await js.add_stream(name=cfg.stream, subjects=cfg.stream_subjects)
            except Exception as exc:
                raise ConnectorError(f"cannot look up stream {cfg.stream!r}: {exc}") from None
        self._ids = itertools.count()
        self._inbox = self._nc.new_inbox()
        self._sub: Subscription = await self._nc.subscribe_direct(
            self._inbox + ".*.*", self._on_ack)
        self._prefix_len = len(self._inbox) + 1

    def _on_ack(self, subject: str, _reply: str, data: bytes,
                headers: dict[str, str] | None) -> None:
        """A PubAck, straight from the read loop (direct delivery)."""
        batch_id, _, index_text = subject[self._prefix_len:].partition(".")
        state = self._batches.get(batch_id)
        if state is None:
            return  # a late ack for a batch that timed out; its retry is deduplicated
        index = int(index_text)
        if state.seen[index]:
            return
        state.seen[index] = 1
        if headers and headers.get("Status") == "503":
            target = state.subjects[index] if index < len(state.subjects) else "?"
            state.errors[index] = RetryableError(
                f"no stream captures subject {target!r} (no responders)")
        elif b'"error"' in data:
            state.errors[index] = _pub_error(data)
        state.remaining -= 1
        if state.remaining == 0 and not state.done.done():
            state.done.set_result(None)

    def _on_disconnect(self) -> None:
        """PubAcks the server sent to the lost connection will never come: end the
        waits of the batches in flight now rather than after ``ack_timeout``. Their
        retries carry the same Nats-Msg-Id, so what the server stored is not stored
        twice."""
        self._unanswered = False  # a new connection: nothing queued on it
        for state in self._batches.values():
            state.lost = True
            if not state.done.done():
                state.done.set_result(None)

    async def _wait_until_moving(self) -> None:
        """After PubAcks timed out: publish nothing until a PONG shows the server
        reads this connection again (or a reconnect replaced it)."""
        try:
            await self._nc.flush(timeout=self.config.ack_timeout)  # type: ignore[arg-type]
        except FlushTimeoutError:
            raise RetryableError(
                f"no PubAck and no PONG within {self.config.ack_timeout}s: the "
                "connection is stalled; earlier publishes are still queued") from None
        self._unanswered = False

    async def write_batch(self, messages: Sequence[Message]) -> None:
        cfg = self.config
        nc = self._nc
        if self._unanswered and nc.is_connected:
            try:
                await self._wait_until_moving()
            except ConnectorError:
                raise
            except Exception as exc:
                raise nats_error(exc) from exc
        batch_id = str(next(self._ids))
        state = _InFlight(len(messages))
        self._batches[batch_id] = state
        prefix = f"{self._inbox}.{batch_id}."
        render = self._template.render
        dedupe = cfg.dedupe
        expected = cfg.stream
        max_payload = nc.max_payload
        subjects = state.subjects
        commands: list[bytes] = []
        nbytes = 0
        try:
            for i, m in enumerate(messages):
                subject = ""
                try:
                    subject = render(m)
                    subjects.append(subject)
                    if len(m.data) > max_payload:
                        raise RejectedError(f"payload of {len(m.data)} bytes exceeds the "
                                            f"server's max_payload {max_payload}")
                    headers = dict(m.headers) if m.headers else {}
                    if dedupe and m.id is not None:
                        headers[MSG_ID] = m.id
                    if expected:
                        headers["Nats-Expected-Stream"] = expected
                    commands.append(encode_publish(subject, m.data, headers, prefix + str(i)))
                    nbytes += len(m.data)
                except (RejectedError, BadSubjectError, BadHeaderError, UnicodeError) as exc:
                    if isinstance(exc, BadSubjectError):
                        exc = RejectedError(f"invalid NATS subject for message {i}")
                    elif isinstance(exc, BadHeaderError | UnicodeError):
                        # A header name NATS cannot carry, or a value that is not
                        # UTF-8 (e.g. raw bytes from a Kafka header): poison, not retry.
                        exc = RejectedError(f"header NATS cannot carry in message {i}: {exc}")
                    if len(subjects) == i:
                        subjects.append(subject)
                    state.errors[i] = exc
                    state.seen[i] = 1
                    state.remaining -= 1
            await nc.send_encoded(commands, len(commands), nbytes)
            if state.remaining > 0:
                missing = ""
                try:
                    await asyncio.wait_for(asyncio.shield(state.done), cfg.ack_timeout)
                except TimeoutError:
                    missing = f"no PubAck within {cfg.ack_timeout}s"
                if state.lost:
                    missing = "connection to the server lost before the PubAck came"
                elif missing:
                    self._unanswered = True
                if missing:
                    for i in range(len(messages)):
                        if not state.seen[i]:
                            state.errors[i] = RetryableError(missing)
        except ConnectorError:
            raise
        except Exception as exc:
            raise nats_error(exc) from exc
        finally:
            del self._batches[batch_id]
        if state.errors:
            if len(state.errors) == len(messages) and all(
                isinstance(e, RetryableError) for e in state.errors.values()
            ):
                raise next(iter(state.errors.values()))
            raise PartialWriteError(state.errors)

    async def close(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=5)
            await nc.close()


def _pub_error(data: bytes) -> RetryableError | RejectedError:
    try:
        error = json.loads(data).get("error", {})
    except ValueError:
        return RetryableError(f"unreadable PubAck: {data[:200]!r}")
    code = error.get("err_code")
    text = f"JetStream error {error.get('code')}/{code}: {error.get('description')}"
    if code in _POISON_CODES:
        return RejectedError(text)
    return RetryableError(text)
