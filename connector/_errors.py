"""One error hierarchy for plugins and the host.

Sinks raise :class:`RetryableError` for failures that another attempt may
cure, :class:`RejectedError` for poison that no retry helps, and
:class:`PartialWriteError` when only some messages of a batch failed.
"""

from __future__ import annotations

from collections.abc import Mapping


class ConnectorError(Exception):
    """Root of every error natsconn raises on purpose."""


class ConfigError(ConnectorError):
    """A pipeline file or plugin option is wrong.

    ``location`` is ``file:line`` (``file:line:column`` for an expression) where
    known and ``path`` the YAML path
    (``pipelines[0].source.stream``); the message says what was expected and
    what was found.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        path: str | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.path = path
        self.column = column
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
            if self.line is not None and self.column is not None:
                where += f":{self.column}"
            where += ": "
        path = f"{self.path}: " if self.path else ""
        return f"{where}{path}{self.message}"


class PluginLoadError(ConnectorError):
    """A plugin could not be found, imported, or is registered twice."""


class RetryableError(ConnectorError):
    """A failure another attempt may cure (connection lost, leader moved, timeout).

    ``retry_after`` (seconds) is a hint from the far side; the engine waits at
    least that long before the next attempt.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RejectedError(ConnectorError):
    """Poison: the far side refuses this message and always will (too large,
    invalid name, constraint violation). It goes to the dead-letter target."""


class PartialWriteError(ConnectorError):
    """Some messages of a batch were not written.

    ``failed`` maps the index of each failed message in the batch handed to
    ``write_batch`` to its error, a :class:`RetryableError` or a
    :class:`RejectedError`. Every index not in ``failed`` was written durably.
    """

    def __init__(self, failed: Mapping[int, RetryableError | RejectedError]) -> None:
        self.failed = dict(failed)
        kinds = sorted({type(e).__name__ for e in self.failed.values()})
        super().__init__(f"{len(self.failed)} message(s) failed ({', '.join(kinds)})")


class EndOfInput(ConnectorError):
    """A finite source has nothing more to give; the pipeline drains and stops."""
