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

Nor does it publish again what the timed-out attempt already published on that
connection: the batch's PubAck record stays open, so the PubAcks that come once
the server reads again are still counted, and the retry of those messages
(the same :class:`Message` objects, as the engine retries them) takes their
PubAcks instead of publishing a second copy, which a stream without
``Nats-Msg-Id`` dedupe would store twice. Only the messages whose PubAck does
not come within ``ack_timeout`` of the connection moving, or whose connection
was lost, are published again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import weakref
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
# JetStream API error codes that no retry can cure: each is about the message
# itself (its size, or a Nats-* header it carries, e.g. copied from a Kafka
# record), so it is rejected (dead-lettered with the reason), not retried.
_POISON_CODES = {
    10054,  # message size exceeds maximum allowed
    10097,  # header size exceeds maximum allowed of 64k
    10071,  # wrong last sequence
    10164,  # wrong last sequence (per subject)
    10193,  # missing sequence for expected last sequence per subject
    10070,  # wrong last msg id
    10060,  # expected stream does not match
    10165,  # invalid per-message TTL (Nats-TTL)
    10166,  # per-message TTL is disabled
    10168, 10169, 10170, 10171, 10172,  # message counters (Nats-Incr) disabled/invalid
    10175, 10177, 10201,  # atomic publish headers without a batch, or misused
    10188, 10189, 10190, 10191, 10192,  # message schedules disabled/invalid
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
    __slots__ = ("batch_id", "done", "errors", "holders", "lost", "remaining", "seen",
                 "subjects")

    def __init__(self, n: int, batch_id: str) -> None:
        self.batch_id = batch_id
        self.subjects: list[str] = []  # as published, by index, for error messages
        self.remaining = n
        self.seen = bytearray(n)
        self.errors: dict[int, RetryableError | RejectedError] = {}
        self.done = asyncio.get_running_loop().create_future()
        self.lost = False  # the connection dropped before every PubAck came
        self.holders = 0  # _Held entries still waiting on this record


class _Held:
    """A message published by a write that timed out on a connection still up: its
    PubAck may still come, into ``state`` at ``index``."""

    __slots__ = ("index", "ref", "state")

    def __init__(self, ref: weakref.ref[Message], state: _InFlight, index: int) -> None:
        self.ref = ref
        self.state = state
        self.index = index


class JetStreamSink(Sink[JetStreamSinkConfig]):
    """JetStream publish with PubAck, pipelined per batch, deduplicated by message id."""

    Config = JetStreamSinkConfig

    async def connect(self) -> None:
        cfg = self.config
        self._template = AddressTemplate(cfg.subject)
        self._batches: dict[str, _InFlight] = {}
        self._held: dict[int, _Held] = {}  # by id(Message): see the module docstring
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
        self._held.clear()  # what the lost connection held may be gone: publish again
        for batch_id in [b for b, st in self._batches.items() if st.holders]:
            del self._batches[batch_id]

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
        settled = await self._take_held(messages) if self._held else None
        batch_id = str(next(self._ids))
        state = _InFlight(len(messages), batch_id)
        self._batches[batch_id] = state
        prefix = f"{self._inbox}.{batch_id}."
        render = self._template.render
        dedupe = cfg.dedupe
        expected = cfg.stream
        max_payload = nc.max_payload
        subjects = state.subjects
        commands: list[bytes] = []
        errors: dict[int, RetryableError | RejectedError] = {}
        nbytes = 0
        try:
            for i, m in enumerate(messages):
                if settled is not None and i in settled:
                    # acknowledged (or refused) for an earlier attempt: not again
                    error = settled[i]
                    if error is not None:
                        state.errors[i] = error
                    subjects.append("")
                    state.seen[i] = 1
                    state.remaining -= 1
                    continue
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
                    # Not into state.errors: a PubAck may still come into that record.
                    unanswered = RetryableError(missing)
                    for i, m in enumerate(messages):
                        if not state.seen[i]:
                            errors[i] = unanswered
                            if not state.lost:
                                self._hold(m, state, i)
        except ConnectorError:
            raise
        except Exception as exc:
            raise nats_error(exc) from exc
        finally:
            if not state.holders:
                self._batches.pop(batch_id, None)
        errors.update(state.errors)
        if errors:
            if len(errors) == len(messages) and all(
                isinstance(e, RetryableError) for e in errors.values()
            ):
                raise next(iter(errors.values()))
            raise PartialWriteError(errors)

    def _hold(self, message: Message, state: _InFlight, index: int) -> None:
        key = id(message)
        held = self._held

        def forget(ref: weakref.ref[Message]) -> None:  # the engine let go of it
            entry = held.get(key)
            if entry is not None and entry.ref is ref:
                del held[key]
                self._release(entry.state)

        old = held.get(key)
        if old is not None:
            self._release(old.state)
        held[key] = _Held(weakref.ref(message, forget), state, index)
        state.holders += 1

    def _release(self, state: _InFlight) -> None:
        state.holders -= 1
        if state.holders <= 0:
            self._batches.pop(state.batch_id, None)

    async def _take_held(self, messages: Sequence[Message]
                         ) -> dict[int, RetryableError | RejectedError | None] | None:
        """For the messages an earlier, timed-out attempt published on this
        connection: wait (``ack_timeout`` at most) for their PubAcks, and say which
        need no new publish (None: stored; an error: refused) by index."""
        held = self._held
        mine: list[tuple[int, _Held]] = []
        for i, m in enumerate(messages):
            entry = held.get(id(m))
            if entry is not None and entry.ref() is m:
                mine.append((i, entry))
        if not mine:
            return None
        waits = {e.state.done for _, e in mine if not e.state.seen[e.index]}
        if waits:
            await asyncio.wait(waits, timeout=self.config.ack_timeout)
        out: dict[int, RetryableError | RejectedError | None] = {}
        for i, entry in mine:
            state, index = entry.state, entry.index
            if state.lost or not state.seen[index]:
                continue  # published again below; its hold stays until then
            del held[id(messages[i])]
            self._release(state)
            error = state.errors.get(index)
            if not isinstance(error, RetryableError):
                out[i] = error
        return out

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
