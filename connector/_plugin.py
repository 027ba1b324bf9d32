"""The three plugin kinds: Source, Sink, Transform, and their option models."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict

from ._batch import Batch
from ._context import PluginContext
from ._errors import RejectedError
from ._message import Message


class PluginConfig(BaseModel):
    """Base of every plugin's options. Unknown keys are errors, not ignored.

    Validators may read ``info.context["base_dir"]``: the folder of the pipeline
    file being loaded, against which a relative file path in an option resolves
    (absent when the options do not come from a file).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class Plugin(Generic[ConfigT]):
    """Common shape: a pydantic ``Config`` and a constructor taking it."""

    Config: ClassVar[type[PluginConfig]] = PluginConfig

    def __init__(self, config: ConfigT, context: PluginContext | None = None) -> None:
        self.config = config
        self.context = context if context is not None else PluginContext()

    @classmethod
    def description(cls) -> str:
        """One line for ``natsconn plugins``: the docstring's first line."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def make_test_instance(cls, context: PluginContext | None = None, **options: Any) -> Self:
        """Build an instance from plain options, validated as a pipeline file would be.

        For plugin tests that need no installed entry point.
        """
        config = cls.Config.model_validate(options)
        return cls(config, context)  # type: ignore[arg-type]


class Source(Plugin[ConfigT], ABC):
    """Reads batches. Pull-based: the engine calls ``read_batch`` only when it has
    room, so a slow sink holds the source back without any extra machinery."""

    @classmethod
    def shareable(cls, config: PluginConfig) -> bool:
        """Do several replicas reading with ``config`` split the work between them
        (a JetStream durable, a consumer group, SKIP LOCKED claims, a queue group)
        rather than each get every message? ``natsconn run --workers N`` runs a
        pipeline whose source is not shareable in one worker only. The safe
        default is no."""
        return False

    async def connect(self) -> None:
        """Open connections; raise :class:`ConnectorError` subclasses on failure."""

    @abstractmethod
    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        """Return up to ``max_messages`` messages, waiting at most ``max_wait``
        seconds for the first; ``None`` when nothing came. Raise
        :class:`EndOfInput` when a finite source is exhausted."""

    async def close(self) -> None:
        """Release connections. Unacknowledged messages stay with the far side."""


class Sink(Plugin[ConfigT], ABC):
    """Writes batches durably."""

    async def connect(self) -> None:
        """Open connections; raise :class:`ConnectorError` subclasses on failure."""

    @abstractmethod
    async def write_batch(self, messages: Sequence[Message]) -> None:
        """Return only when every message is durable on the far side.

        Raise :class:`RetryableError`, :class:`RejectedError`, or
        :class:`PartialWriteError` naming the indices that failed.
        """

    async def close(self) -> None:
        """Flush and release connections."""


@dataclass(slots=True, frozen=True)
class Rejected:
    """A transform's verdict that ``message`` is poison, with the reason."""

    message: Message
    reason: str


class Transform(Plugin[ConfigT]):
    """Changes messages between source and sink.

    Override ``process_one`` for per-message work (return a message, a list of
    messages to split, or ``None`` to drop; raise :class:`RejectedError` for
    poison), or ``process`` for whole-batch work. ``process`` may be an
    ``async def`` when the work needs I/O (a schema registry, an object store);
    ``connect`` and ``close`` open and release what it uses, with the pipeline.
    A transform that drops messages on purpose reports how many with
    ``self.context.meters.filtered(n)``.
    """

    async def connect(self) -> None:
        """Open connections the transform needs; called before the source connects."""

    async def close(self) -> None:
        """Release them; called when the pipeline closes."""

    def process(
        self, messages: list[Message]
    ) -> Sequence[Message | Rejected] | Awaitable[Sequence[Message | Rejected]]:
        out: list[Message | Rejected] = []
        for message in messages:
            try:
                result = self.process_one(message)
            except RejectedError as exc:
                out.append(Rejected(message, str(exc)))
                continue
            if result is None:
                continue
            if isinstance(result, Message):
                out.append(result)
            else:
                out.extend(result)
        return out

    def process_one(self, message: Message) -> Message | list[Message] | None:
        return message
