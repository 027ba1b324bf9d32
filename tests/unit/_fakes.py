"""In-process fake plugins for engine tests, and helpers to build pipelines from YAML.

The fakes record what the engine does to them (reads, writes, acks) so tests can
assert on the engine's behaviour without any server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

import yaml
from pydantic import Field

from connector import (
    Batch,
    Duration,
    EndOfInput,
    Message,
    PluginConfig,
    RejectedError,
    Sink,
    Source,
    Transform,
)
from connector.config import LoadedFile, load_text
from connector.engine import Pipeline
from connector.registry import Registry


class RecordingAck:
    """An ack handle that records every call, in order, into a shared log."""

    def __init__(self, label: str, log: list[tuple[str, str, Any]] | None = None) -> None:
        self.label = label
        self.calls: list[tuple[str, Any]] = []
        self.log = log if log is not None else []

    def _record(self, kind: str, arg: Any = None) -> None:
        self.calls.append((kind, arg))
        self.log.append((kind, self.label, arg))

    async def ack(self) -> None:
        self._record("ack")

    async def nack(self, delay: float | None = None) -> None:
        self._record("nack", delay)

    async def term(self, reason: str) -> None:
        self._record("term", reason)

    async def in_progress(self) -> None:
        self._record("in_progress")

    @property
    def settlements(self) -> list[tuple[str, Any]]:
        return [c for c in self.calls if c[0] != "in_progress"]


def msg(i: int, size: int | None = None, subject: str | None = None, **kw: Any) -> Message:
    data = f"m{i}".encode()
    if size is not None:
        data = data.ljust(size, b".")
    return Message(data, subject if subject is not None else f"in.{i}", id=f"id-{i}", **kw)


# ---------------------------------------------------------------- the source


class FakeSourceConfig(PluginConfig):
    key: str = ""
    connect_failures: int = Field(0, description="connect raises this many times per key")
    per_read: int = Field(0, description="if > 0: produce this many messages per read, for ever")
    pause: Duration = 0.0
    size: int = 8


class FakeSource(Source[FakeSourceConfig]):
    """Gives what the test feeds; or, with ``per_read``, endless messages."""

    Config = FakeSourceConfig
    connect_attempts: ClassVar[dict[str, int]] = {}
    instances: ClassVar[dict[str, list[FakeSource]]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue: asyncio.Queue[Batch | BaseException] = asyncio.Queue()
        self.reads = 0
        self.read_messages = 0
        self.acks: list[RecordingAck] = []
        self.log: list[tuple[str, str, Any]] = []
        self.connected = False
        self.closed = False
        self._seq = 0
        FakeSource.instances.setdefault(self.config.key, []).append(self)

    async def connect(self) -> None:
        n = FakeSource.connect_attempts.get(self.config.key, 0) + 1
        FakeSource.connect_attempts[self.config.key] = n
        if n <= self.config.connect_failures:
            raise ConnectionError(f"fake connect failure {n}")
        self.connected = True

    def feed(self, messages: Sequence[Message], label: str | None = None) -> RecordingAck:
        ack = RecordingAck(label or f"b{len(self.acks)}", self.log)
        self.acks.append(ack)
        self.queue.put_nowait(Batch(list(messages), ack))
        return ack

    def end(self) -> None:
        self.queue.put_nowait(EndOfInput("fake source ended"))

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        self.reads += 1
        if self.config.per_read:
            if self.config.pause:
                await asyncio.sleep(self.config.pause)
            n = min(max_messages, self.config.per_read)
            first = self._seq
            self._seq += n
            ack = RecordingAck(f"b{len(self.acks)}", self.log)
            self.acks.append(ack)
            self.read_messages += n
            return Batch([msg(i, self.config.size) for i in range(first, first + n)], ack)
        try:
            item = await asyncio.wait_for(self.queue.get(), max_wait)
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        assert len(item.messages) <= max_messages, "engine asked for fewer than was fed"
        self.read_messages += len(item.messages)
        return item

    async def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------ the sink

Behaviour = Callable[[Sequence[Message], int], Awaitable[None]]


def takes(seconds: float) -> Behaviour:
    """A sink behaviour: every write attempt takes ``seconds``."""

    async def slow(_messages: Sequence[Message], _attempt: int) -> None:
        await asyncio.sleep(seconds)

    return slow


class FakeSinkConfig(PluginConfig):
    key: str = ""


class FakeSink(Sink[FakeSinkConfig]):
    """Records every write attempt; ``behaviour`` may fail or block a write."""

    Config = FakeSinkConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: list[list[Message]] = []
        self.written: list[Message] = []
        self.active = 0
        self.max_active = 0
        self.behaviour: Behaviour | None = None
        self.closed = False

    async def write_batch(self, messages: Sequence[Message]) -> None:
        self.attempts.append(list(messages))
        attempt = len(self.attempts)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.behaviour is not None:
                await self.behaviour(messages, attempt)
        finally:
            self.active -= 1
        self.written.extend(messages)

    async def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------- transforms


class DropOddConfig(PluginConfig):
    pass


class DropOdd(Transform[DropOddConfig]):
    """Keeps messages whose id ends in an even digit (a filter)."""

    Config = DropOddConfig

    def process_one(self, message: Message) -> Message | None:
        return message if int((message.id or "0").rsplit("-", 1)[-1]) % 2 == 0 else None


class RejectBadConfig(PluginConfig):
    pass


class RejectBad(Transform[RejectBadConfig]):
    """Rejects messages whose data starts with ``bad``."""

    Config = RejectBadConfig

    def process_one(self, message: Message) -> Message:
        if message.data.startswith(b"bad"):
            raise RejectedError(f"bad payload {message.data[:10]!r}")
        return message


class SplitConfig(PluginConfig):
    pass


class Split(Transform[SplitConfig]):
    """Turns each message into two (``-a`` and ``-b``)."""

    Config = SplitConfig

    def process_one(self, message: Message) -> list[Message]:
        return [
            Message(message.data + b"-a", message.subject, id=f"{message.id}-a"),
            Message(message.data + b"-b", message.subject, id=f"{message.id}-b"),
        ]


class KeepOneInTenConfig(PluginConfig):
    pass


class KeepOneInTen(Transform[KeepOneInTenConfig]):
    """Keeps one message in ten (a heavy filter)."""

    Config = KeepOneInTenConfig

    def process_one(self, message: Message) -> Message | None:
        return message if int((message.id or "0").rsplit("-", 1)[-1]) % 10 == 0 else None


def unique(prefix: str = "p") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def pipeline_spec(**spec: Any) -> dict[str, Any]:
    """A pipeline block with fake source and sink unless given, fast retries."""
    out: dict[str, Any] = {
        "name": unique(),
        "source": {"type": "fake"},
        "sink": {"type": "fake"},
        "retry": {"initial_backoff": "1ms", "max_backoff": "5ms"},
        "in_progress_interval": 0,
    }
    out.update(spec)
    return out


def load(*pipelines: dict[str, Any], **top: Any) -> LoadedFile:
    doc = {"pipelines": list(pipelines), "http": {"enabled": False}, **top}
    return load_text(yaml.safe_dump(doc, sort_keys=False), "test.yaml", REGISTRY, env={})


def make_pipeline(**spec: Any) -> Pipeline:
    loaded = load(pipeline_spec(**spec))
    return Pipeline(loaded.pipelines[0])


async def until(predicate: Callable[[], bool], timeout: float = 5.0,
                step: float = 0.001) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""

    async def loop() -> None:
        while not predicate():  # noqa: ASYNC110 - polling fakes is the point
            await asyncio.sleep(step)

    await asyncio.wait_for(loop(), timeout)


class ExplodeConfig(PluginConfig):
    pass


class Explode(Transform[ExplodeConfig]):
    """A buggy transform: raises on a message whose data is ``boom``."""

    Config = ExplodeConfig

    def process_one(self, message: Message) -> Message:
        if message.data == b"boom":
            raise ValueError("transform bug")
        return message


REGISTRY = Registry.make_test_instance({
    "source": {"fake": FakeSource},
    "sink": {"fake": FakeSink},
    "transform": {"drop_odd": DropOdd, "reject_bad": RejectBad, "split": Split,
                  "keep_one_in_ten": KeepOneInTen, "explode": Explode},
})
