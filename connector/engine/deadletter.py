"""Sending poison and exhausted messages to a dead-letter target, with the reason.

Each letter carries ``Natsconn-Error*`` headers (docs/delivery.md). A target
that fails is retried with backoff until the shutdown deadline; one that
refuses a letter outright, or no target at all, terminates the message at the
source (logged and counted): a retry could never help.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .._errors import PartialWriteError, RejectedError
from .._message import Message
from ..config.model import RetryPolicy
from ..ops.metrics import PipelineMetrics
from .backoff import Backoff
from .batcher import SinkBatch
from .shutdown import Shutdown, Stopped

# Headers added to dead-lettered messages (documented in docs/delivery.md).
H_ERROR = "Natsconn-Error"
H_ERROR_KIND = "Natsconn-Error-Kind"
H_ATTEMPTS = "Natsconn-Attempts"
H_PIPELINE = "Natsconn-Pipeline"
H_SUBJECT = "Natsconn-Original-Subject"
H_SOURCE_ID = "Natsconn-Source-Id"
H_SINK = "Natsconn-Sink"

Resolve = Callable[[SinkBatch, Sequence[int]], Awaitable[None]]


class DeadLetter:
    def __init__(self, target: Any, pipeline: str, retry: RetryPolicy, shutdown: Shutdown,
                 metrics: PipelineMetrics, log: logging.Logger, sink_name: str | None = None,
                 counter: Any = None, distinct: bool = False) -> None:
        self.target = target  # a Sink, or None
        self._pipeline = pipeline
        self._retry = retry
        self._shutdown = shutdown
        self._metrics = metrics
        self._log = log
        self._sink_name = sink_name
        self._counter = counter  # the sink's own dead-lettered counter, if any
        # With several sinks, two may dead-letter the same message into one target:
        # the letters' ids name the sink, so a deduplicating target keeps both.
        self._distinct = distinct

    def for_sink(self, sink_name: str, counter: Any, distinct: bool = False) -> DeadLetter:
        """The same target, labelling letters with the sink that could not write them."""
        return DeadLetter(self.target, self._pipeline, self._retry, self._shutdown,
                          self._metrics, self._log, sink_name, counter, distinct)

    def letter(self, m: Message, error: Exception, attempts: int, kind: str) -> Message:
        # A header that is not UTF-8 (bytes from Kafka or Redis, as lone surrogates)
        # may be why the sink refused the message; the letter carries it escaped.
        headers = {carriable(k): carriable(v) for k, v in m.headers.items()}
        headers[H_ERROR] = header_safe(str(error) or type(error).__name__)
        headers[H_ERROR_KIND] = kind
        headers[H_ATTEMPTS] = str(attempts)
        headers[H_PIPELINE] = self._pipeline
        if self._sink_name is not None:
            headers[H_SINK] = self._sink_name
        if m.subject is not None:
            headers[H_SUBJECT] = carriable(m.subject)
        if m.id is not None:
            headers[H_SOURCE_ID] = m.id
        letter_id = m.id
        if self._distinct and m.id is not None and self._sink_name is not None:
            letter_id = f"{m.id}@{self._sink_name}"
        return Message(m.data, m.subject, m.key, headers, m.timestamp, letter_id)

    async def send(self, batch: SinkBatch, failed: Sequence[tuple[int, Exception]],
                   attempts: int, kind: str, resolve: Resolve) -> None:
        """Dead-letter ``failed`` (indices of ``batch`` with their errors); resolve them."""
        if self.target is None:
            for i, error in failed:
                message = batch.messages[i]
                self._log.error(
                    "message rejected and no dead_letter is configured; terminating it at the "
                    "source: %s", error,
                    extra={"pipeline": self._pipeline, "source_id": message.id,
                           "subject": message.subject},
                )
                batch.owner(i).terminate(f"{kind}: {error}")
            self._metrics.rejected_unrouted.inc(len(failed))
            await resolve(batch, batch.claim([i for i, _ in failed]))
            return
        letters = [self.letter(batch.messages[i], error, attempts, kind) for i, error in failed]
        refused = await self._write(letters)
        for j, why in refused:
            # The last resort refuses it too (too large for it as well, say): a retry
            # cannot help and would hold the batch for ever. Terminate it at the source.
            i, error = failed[j]
            self._log.error("the dead_letter target refused a message; terminating it at the "
                            "source: %s", why, extra={"pipeline": self._pipeline,
                                                      "source_id": batch.messages[i].id})
            batch.owner(i).terminate(f"{kind}: {error}; the dead_letter target refused it: "
                                     f"{why}")
        self._metrics.rejected_unrouted.inc(len(refused))
        written = len(letters) - len(refused)
        if written:
            self._metrics.dead_lettered.inc(written)
            if self._counter is not None:
                self._counter.inc(written)
            self._log.warning("%d message(s) dead-lettered (%s): %s", written, kind,
                              failed[0][1], extra={"pipeline": self._pipeline})
        await resolve(batch, batch.claim([i for i, _ in failed]))

    async def _write(self, letters: list[Message]) -> list[tuple[int, Exception]]:
        """Write every letter, retrying; return the positions the target refused."""
        retry = self._retry
        backoff = Backoff(retry.initial_backoff, retry.max_backoff, retry.multiplier)
        todo = list(range(len(letters)))
        refused: list[tuple[int, Exception]] = []
        while todo:
            again: list[int] = []
            try:
                await self._shutdown.write(self.target, [letters[j] for j in todo])
            except Stopped:
                raise
            except PartialWriteError as exc:
                known = {k: e for k, e in exc.failed.items() if 0 <= k < len(todo)}
                refused += [(todo[k], e) for k, e in known.items()
                            if isinstance(e, RejectedError)]
                again = [todo[k] for k, e in known.items() if not isinstance(e, RejectedError)]
                last: Exception = exc
            except RejectedError as exc:
                refused += [(j, exc) for j in todo]
            except Exception as exc:
                again, last = todo, exc
            todo = again
            if todo:
                wait = backoff.next(getattr(last, "retry_after", None))
                self._log.error("dead-letter write failed, retrying in %.2fs: %s", wait, last,
                                extra={"pipeline": self._pipeline})
                await self._shutdown.sleep_or_deadline(wait)
        return refused


def header_safe(text: str) -> str:
    """Header values are one line."""
    return carriable(" ".join(text.split())[:1000])


def carriable(text: str) -> str:
    """``text`` as UTF-8 any target can carry: bytes that are not UTF-8, which the
    Kafka and Redis sources keep as lone surrogates, become ``\\xff`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no decoder made: U+D800 written as \ud800
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
