"""Which sinks each message goes to: every matching one, or the first.

``broadcast`` (the default) sends a message to every sink whose ``when:``
holds (a sink without ``when:`` takes everything); ``switch`` sends it to the
first such sink, in the order written. A message no sink takes is dropped
(acknowledged and counted ``natsconn_filtered{reason="unrouted"}``) or, with
``unmatched: dead_letter``, dead-lettered. A ``when:`` that fails on a message
(a field it reads is missing) dead-letters that message once with the reason;
with ``broadcast`` the other sinks still get it, with ``switch`` none does.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import RejectedError
from .._expr import Bindings, Expression
from .._message import Message
from .._plugin import Rejected

UNMATCHED_REASON = "no sink's `when:` matched the message"


class Router:
    __slots__ = ("_conditions", "_dead_letter_unmatched", "_everything", "_first_match", "_n")

    def __init__(self, conditions: Sequence[Expression | None], mode: str,
                 unmatched: str) -> None:
        self._conditions = list(conditions)
        self._n = len(self._conditions)
        self._first_match = mode == "switch"
        self._dead_letter_unmatched = unmatched == "dead_letter"
        # Every message to every sink (one sink, or a broadcast without conditions):
        # no per-message work at all.
        first = self._conditions[0] if self._conditions else None
        self._everything = (all(c is None for c in self._conditions) if not self._first_match
                            else first is None)

    def route(self, messages: list[Message]
              ) -> tuple[list[list[Message]], list[Message], list[Rejected]]:
        """Per sink its messages; the messages no sink took; the ones that failed."""
        if self._everything:
            if self._first_match:
                return [messages] + [[] for _ in range(self._n - 1)], [], []
            return [messages] * self._n, [], []
        per: list[list[Message]] = [[] for _ in range(self._n)]
        unmatched: list[Message] = []
        rejected: list[Rejected] = []
        conditions, first_match = self._conditions, self._first_match
        for message in messages:
            bindings = Bindings(message)
            hits: list[int] = []
            failure: str | None = None
            for k, condition in enumerate(conditions):
                try:
                    if condition is None or condition.test(bindings):
                        hits.append(k)
                        if first_match:
                            break
                except RejectedError as exc:
                    # Broadcast: only the sink whose `when:` failed loses the message
                    # (it is dead-lettered once); switch cannot tell the first match.
                    failure = failure or str(exc)
                    if first_match:
                        break
            if failure is not None:
                rejected.append(Rejected(message, failure))
                if first_match:
                    continue
            if not hits and failure is not None:
                continue
            if not hits:
                unmatched.append(message)
                continue
            for k in hits:
                per[k].append(message)
        if unmatched and self._dead_letter_unmatched:
            rejected.extend(Rejected(m, UNMATCHED_REASON) for m in unmatched)
            unmatched = []
        return per, unmatched, rejected
