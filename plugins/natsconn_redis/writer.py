"""What the four Redis sinks share: commands built per batch, sent pipelined.

A sink turns a batch into Redis commands, each tied to the message indices it
writes. They go out in one pipeline (``transaction=False``: no MULTI, so one
failing command does not undo the others) and every reply is checked, so a
batch costs one round trip. Batches of more than ``chunk_size`` commands are
sent as several pipelines one after the other, so that packing a huge batch
never holds the event loop for long.

Replies are mapped per command: a refusal that no retry cures (WRONGTYPE,
NOPERM, a syntax error) makes those messages :class:`RejectedError`; an
out-of-memory, read-only replica or loading server makes them retryable; a
lost connection, or no reply within ``socket_timeout`` for the whole round
trip, makes the whole rest of the batch retryable (Redis may have applied part
of a pipeline before the connection broke; a retry then writes those again:
at least once). A timed-out connection is never reused half read.

A round trip that times out is not cancelled, though: its commands are on the
wire (or queued in the route) and a server that was only stalled executes them
when it reads again. Dropping the connection would not take them back, and a
retry on a new connection would write them a second time. So the round trip is
*held*: it keeps its connection and goes on waiting for its replies, and the
retry of those messages (the same :class:`Message` objects, as the engine
retries them) waits for them instead of sending the commands again. Only when
the server answers a PING on another connection while the held one still says
nothing after another ``socket_timeout`` is that connection taken as broken:
then it is dropped and its messages are sent again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import Field

from connector import (
    ByteSize,
    Message,
    PartialWriteError,
    RejectedError,
    RetryableError,
    Sink,
)

from .connection import (
    RedisConnectionConfig,
    RedisLink,
    command_error,
    is_connection_error,
    open_link,
)

Command = tuple[Any, ...]
Planned = list[tuple[Sequence[int], Command]]
Failures = dict[int, RetryableError | RejectedError]


class RedisSinkConfig(RedisConnectionConfig):
    max_message_bytes: ByteSize = Field(
        512 * 1024 * 1024, description="larger payloads are rejected (dead-lettered); Redis "
        "refuses values over proto-max-bulk-len, 512MiB by default")
    chunk_size: int = Field(1000, ge=1, le=100_000, description="commands per pipelined "
                            "round trip; larger batches are sent in several")


ConfigT = TypeVar("ConfigT", bound=RedisSinkConfig)


class _Trip:
    """One pipelined round trip that timed out and is held (see the module
    docstring): its task, its commands, and how many messages still wait on it."""

    __slots__ = ("commands", "holders", "task")

    def __init__(self, task: asyncio.Task[list[Any]], commands: list[Command]) -> None:
        self.task = task
        self.commands = commands
        self.holders = 0

    def drop(self) -> None:
        self.holders -= 1
        if self.holders <= 0 and not self.task.done():
            self.task.cancel()  # nobody waits for it any more: let its connection go


class _Held:
    __slots__ = ("positions", "ref", "trip")

    def __init__(self, ref: weakref.ref[Message], trip: _Trip, positions: list[int]) -> None:
        self.ref = ref
        self.trip = trip
        self.positions = positions  # the message's commands in trip.commands


class CommandSink(Sink[ConfigT]):
    """Base of the Redis sinks: subclasses say which commands a batch becomes."""

    async def connect(self) -> None:
        self.prepare()
        self._held: dict[int, _Held] = {}  # by id(Message)
        self._link: RedisLink = await open_link(self.config, self.context)
        self._r = self._link.client

    def prepare(self) -> None:
        """Compile templates and the like; runs before connecting."""

    @abstractmethod
    def plan(self, messages: Sequence[Message], rejected: Failures) -> Planned:
        """The commands for ``messages``; indices that cannot be written go to
        ``rejected`` with their reason."""

    def reply_error(self, reply: Any, args: Command) -> RetryableError | RejectedError | None:
        """A reply that is not an error but means "not written"; None: written."""
        return None

    def checked(self, messages: Sequence[Message], rejected: Failures,
                build: Callable[[Message], Command | tuple[Command, ...]]) -> Planned:
        """One command (or a few) per message, with size and template checks."""
        limit = self.config.max_message_bytes
        planned: Planned = []
        for i, m in enumerate(messages):
            if len(m.data) > limit:
                rejected[i] = RejectedError(
                    f"payload of {len(m.data)} bytes exceeds max_message_bytes {limit}")
                continue
            try:
                built = build(m)
            except RejectedError as exc:
                rejected[i] = exc
                continue
            if built and isinstance(built[0], tuple):
                planned.extend(((i,), c) for c in built)
            else:
                planned.append(((i,), built))
        return planned

    async def write_batch(self, messages: Sequence[Message]) -> None:
        failed: Failures = {}
        todo: Sequence[Message] = messages
        index: list[int] | None = None  # todo's positions in messages
        if self._held:
            index = await self._take_held(messages, failed)
            todo = [messages[i] for i in index]
        if todo:
            rejected: Failures = {}
            planned = self.plan(todo, rejected)
            sent = await self._send(planned, todo) if planned else {}
            sent.update(rejected)
            for i, error in sent.items():
                failed[i if index is None else index[i]] = error
        if not failed:
            return
        if len(failed) == len(messages) and all(
            isinstance(e, RetryableError) for e in failed.values()
        ):
            raise next(iter(failed.values()))
        raise PartialWriteError(failed)

    async def _send(self, planned: Planned, messages: Sequence[Message]) -> Failures:
        failed: Failures = {}
        size = self.config.chunk_size
        timeout = self.config.socket_timeout
        for start in range(0, len(planned), size):
            part = planned[start:start + size]
            pipe = self._r.pipeline(transaction=False)
            for _, args in part:
                pipe.execute_command(*args)
            task = asyncio.ensure_future(pipe.execute(raise_on_error=False))
            try:
                done, _ = await asyncio.wait({task}, timeout=timeout)
            except asyncio.CancelledError:
                task.cancel()
                raise
            if not done:
                # Held, not cancelled: the server may still execute what it was sent.
                self._hold(task, part, messages)
                error: RetryableError | RejectedError = RetryableError(
                    f"redis: no reply from redis within {timeout:g}s; the round trip is "
                    "held, not sent again")
                self._link.lost(TimeoutError(f"no reply within {timeout:g}s"))
                for indices, _ in planned[start:]:
                    for i in indices:
                        failed.setdefault(i, error)
                break
            try:
                replies = task.result()
            except Exception as exc:
                error = command_error(exc)
                if is_connection_error(exc):
                    self._link.lost(exc)
                for indices, _ in planned[start:]:
                    for i in indices:
                        failed.setdefault(i, error)
                break
            self._link.restored()
            self._check(part, replies, failed)
        return failed

    def _check(self, part: Planned, replies: Sequence[Any], failed: Failures) -> None:
        check = self.reply_error
        for (indices, args), reply in zip(part, replies, strict=True):
            refused = (_named(command_error(reply), args)
                       if isinstance(reply, Exception) else check(reply, args))
            if refused is not None:
                for i in indices:
                    failed.setdefault(i, refused)

    def _hold(self, task: asyncio.Task[list[Any]], part: Planned,
              messages: Sequence[Message]) -> None:
        trip = _Trip(task, [args for _, args in part])
        positions: dict[int, list[int]] = {}
        for pos, (indices, _) in enumerate(part):
            for i in indices:
                positions.setdefault(i, []).append(pos)
        held = self._held
        for i, where in positions.items():
            message = messages[i]
            key = id(message)

            def forget(ref: weakref.ref[Message], key: int = key) -> None:
                entry = held.get(key)
                if entry is not None and entry.ref is ref:
                    del held[key]
                    entry.trip.drop()

            old = held.pop(key, None)
            if old is not None:
                old.trip.drop()
            held[key] = _Held(weakref.ref(message, forget), trip, where)
            trip.holders += 1
        # A task nobody awaits must not log "exception never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _take_held(self, messages: Sequence[Message], failed: Failures) -> list[int]:
        """Settle the messages that a held round trip sent: their replies if it has
        them, else still held (retryable, not sent again) while the server answers
        no one; sent again when it failed or its connection looks broken. Returns
        the positions of the messages to send now."""
        held = self._held
        timeout = self.config.socket_timeout
        trips: dict[_Trip, list[int]] = {}
        todo: list[int] = []
        for i, m in enumerate(messages):
            entry = held.get(id(m))
            if entry is not None and entry.ref() is m:
                trips.setdefault(entry.trip, []).append(i)
            else:
                todo.append(i)
        for trip, mine in trips.items():
            task = trip.task
            if not task.done():
                await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                if not await self._answers():
                    error = RetryableError(
                        "redis: still no reply to a round trip held on a stalled "
                        "connection; its commands are not sent again")
                    for i in mine:
                        failed[i] = error
                    continue
                # Others are answered: give the held connection one more chance.
                await asyncio.wait({task}, timeout=timeout)
            positions: dict[int, list[int]] = {}
            for i in mine:
                entry = held.pop(id(messages[i]))
                positions[i] = entry.positions
                entry.trip.drop()  # cancels the task (its connection) if still running
            if not task.done() or task.cancelled() or task.exception() is not None:
                todo += mine  # broken or lost: Redis may not have it, send again
                continue
            replies = task.result()
            self._link.restored()
            for i in mine:
                for pos in positions[i]:
                    self._check([((i,), trip.commands[pos])], [replies[pos]], failed)
        todo.sort()
        return todo

    async def _answers(self) -> bool:
        """Does the server answer a PING (on some other connection) within the timeout?"""
        try:
            async with self._link.deadline():
                await self._r.ping()
        except Exception:
            return False
        return True

    async def close(self) -> None:
        held = getattr(self, "_held", {})
        tasks = {entry.trip.task for entry in held.values()}
        held.clear()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        link = getattr(self, "_link", None)
        if link is not None:
            await link.close()


def _named(error: RetryableError | RejectedError, args: Command) -> RetryableError | RejectedError:
    """Say which command and key a refusal was about."""
    if not isinstance(error, RejectedError):
        return error
    key = args[1]
    key_text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    return RejectedError(f"{args[0]} {key_text!r}: {error}")
