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
at least once). A timed-out connection is dropped, never reused half read.
"""

from __future__ import annotations

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


class CommandSink(Sink[ConfigT]):
    """Base of the Redis sinks: subclasses say which commands a batch becomes."""

    async def connect(self) -> None:
        self.prepare()
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
        rejected: Failures = {}
        planned = self.plan(messages, rejected)
        failed = await self._send(planned) if planned else {}
        failed.update(rejected)
        if not failed:
            return
        if len(failed) == len(messages) and all(
            isinstance(e, RetryableError) for e in failed.values()
        ):
            raise next(iter(failed.values()))
        raise PartialWriteError(failed)

    async def _send(self, planned: Planned) -> Failures:
        failed: Failures = {}
        size = self.config.chunk_size
        for start in range(0, len(planned), size):
            part = planned[start:start + size]
            pipe = self._r.pipeline(transaction=False)
            for _, args in part:
                pipe.execute_command(*args)
            try:
                async with self._link.deadline():
                    replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                error = command_error(exc)
                if is_connection_error(exc):
                    self._link.lost(exc)
                for indices, _ in planned[start:]:
                    for i in indices:
                        failed.setdefault(i, error)
                break
            self._link.restored()
            check = self.reply_error
            for (indices, args), reply in zip(part, replies, strict=True):
                refused = (_named(command_error(reply), args)
                           if isinstance(reply, Exception) else check(reply, args))
                if refused is not None:
                    for i in indices:
                        failed.setdefault(i, refused)
        return failed

    async def close(self) -> None:
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
