"""Several named expressions over one message, with as few CEL calls as possible.

A CEL call costs microseconds of fixed overhead (crossing into the evaluator
and converting the variables), far more than the work most expressions do. So
a transform with several expressions (a mapping's fields, a set of headers)
evaluates them as one:

- an expression that reads no variable is a constant, evaluated once here;
- one that reads only ``subject``/``tokens`` is evaluated on its own, because
  the SDK remembers its result per subject (a dict lookup after the first);
- every other one joins a single list expression ``[dyn(e1), dyn(e2), …]``,
  one CEL call per message whatever their number.

When that one call fails, each of its expressions is evaluated alone to name
the one that failed (the error path only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from connector import (
    Bindings,
    Expression,
    ExpressionError,
    ExpressionFailed,
    Message,
    Rejected,
    RejectedError,
)

_BY_SUBJECT = frozenset({"subject", "tokens"})


class PlanFailed(ExpressionFailed):
    """One named expression failed on a message; the reason names it."""


def hint(expr: Expression, bindings: Bindings) -> str:
    """What CEL's own error leaves out: that ``data`` was not JSON at all."""
    if "data" in expr.variables and type(bindings.data) is bytes:
        return " (the payload is not JSON, so data is its bytes)"
    return ""


class Plan:
    __slots__ = ("_combined", "_combined_at", "_exprs", "_memo", "_names", "_template",
                 "calls", "variables")

    def __init__(self, named: Sequence[tuple[str, Expression]]) -> None:
        self._names = [n for n, _ in named]
        self._exprs = [e for _, e in named]
        self._template: list[Any] = [None] * len(named)
        self._memo: list[tuple[int, Expression]] = []
        rest: list[int] = []
        for i, expr in enumerate(self._exprs):
            used = expr.variables
            if not used:
                try:
                    self._template[i] = expr.evaluate(Message(b""))
                    continue
                except ExpressionFailed:
                    pass  # fails for every message: each is rejected with the reason
            if used and _BY_SUBJECT.issuperset(used):
                self._memo.append((i, expr))
            else:
                rest.append(i)
        self._combined_at = tuple(rest)
        self._combined: Expression | None = None
        if len(rest) == 1:
            self._combined = self._exprs[rest[0]]
        elif rest:
            # A newline after each part: a part may end in a // comment.
            text = "[" + ", ".join(f"dyn(\n{self._exprs[i].source}\n)" for i in rest) + "]"
            try:
                self._combined = Expression(text)
            except ExpressionError:
                # Each part compiled alone; should their list not, evaluate them alone.
                self._memo.extend((i, self._exprs[i]) for i in rest)
                self._combined_at = ()
        #: CEL calls per message in the common case (the memoized ones cost less).
        self.calls = (1 if self._combined is not None else 0) + len(self._memo)
        self.variables = frozenset(v for e in self._exprs for v in e.variables)

    def __len__(self) -> int:
        return len(self._exprs)

    def shared(self, index: int) -> bool:
        """May the value at ``index`` be the same object for several messages
        (a constant or a per-subject memo)? Then it must be copied before it is
        changed in place."""
        return _BY_SUBJECT.issuperset(self._exprs[index].variables)

    def values(self, bindings: Bindings) -> list[Any]:
        """Every expression's value for this message, in the order given."""
        out = self._template.copy()
        combined = self._combined
        if combined is not None:
            at = self._combined_at
            try:
                got = combined.evaluate(bindings)
            except ExpressionFailed as exc:
                raise self._culprit(bindings, exc) from None
            if len(at) == 1:
                out[at[0]] = got
            else:
                for i, value in zip(at, got, strict=True):
                    out[i] = value
        for i, expr in self._memo:
            try:
                out[i] = expr.evaluate(bindings)
            except ExpressionFailed as exc:
                raise PlanFailed(f"{self._names[i]}: {exc}{hint(expr, bindings)}") from None
        return out

    def _culprit(self, bindings: Bindings, error: ExpressionFailed) -> PlanFailed:
        at = self._combined_at
        if len(at) == 1:
            i = at[0]
            return PlanFailed(f"{self._names[i]}: {error}{hint(self._exprs[i], bindings)}")
        for i in at:
            try:
                self._exprs[i].evaluate(bindings)
            except ExpressionFailed as exc:
                return PlanFailed(f"{self._names[i]}: {exc}{hint(self._exprs[i], bindings)}")
        return PlanFailed(str(error))  # pragma: no cover - every part alone succeeded


def each(messages: list[Message], apply: Callable[[Message], Message], name: str
         ) -> list[Message | Rejected]:
    """``apply`` to every message; one that raises RejectedError is rejected with
    the reason, prefixed with the transform's ``name``."""
    out: list[Message | Rejected] = []
    append = out.append
    for message in messages:
        try:
            append(apply(message))
        except RejectedError as exc:
            append(Rejected(message, f"{name}: {exc}"))
    return out
