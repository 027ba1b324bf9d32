"""OpenTelemetry traces of sink writes (optional extra ``otel``).

The engine asks :func:`tracer` once per pipeline; ``None`` (tracing off, the
default) makes each write skip every tracing step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .._message import Message


class WriteTracer(Protocol):
    """Spans around sink writes, linked to the messages' own trace contexts."""

    def begin(self, pipeline: str, sink: str, messages: Sequence[Message]) -> Any:
        """Start the span of one batch write; the value is handed to :meth:`end`."""

    def end(self, span: Any, error: BaseException | None) -> None:
        """End it, recording ``error`` when the write failed."""


def tracer() -> WriteTracer | None:
    """The process's write tracer, or None when tracing is off."""
    return None
