"""``headers``: copy, remove and set message headers.

In this order: ``copy`` (from the headers as they came), ``remove`` and
``remove_prefix``, then ``set``. So ``copy: {A: B}`` with ``remove: [A]``
renames A to B, and ``set`` wins over everything. ``set`` values are CEL
expressions over the incoming message, like everywhere else: a literal is
quoted (``'"prod"'``) and costs nothing per message (it is evaluated once).
Header names are matched exactly (case-sensitive), as NATS does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from pydantic import Field, model_validator

from connector import Bindings, Message, PluginConfig, Rejected, RejectedError, Transform

from . import _json
from ._fields import StringExpr
from ._plan import Plan, each


class HeadersConfig(PluginConfig):
    copy_: dict[str, str] = Field(
        default_factory=dict, alias="copy", description="header to copy, from name to new "
        "name (a missing header is skipped); with remove, a rename")
    remove: list[str] = Field(default_factory=list, description="headers to delete")
    remove_prefix: list[str] = Field(
        default_factory=list, description="delete every header whose name starts with one "
        "of these, e.g. 'X-Internal-'")
    set_: dict[str, StringExpr] = Field(
        default_factory=dict, alias="set", description="headers to set, name to CEL "
        "expression giving a string, e.g. {X-Env: '\"prod\"', X-Region: 'tokens[1]'}")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not (self.copy_ or self.remove or self.remove_prefix or self.set_):
            raise ValueError("headers needs at least one of copy, remove, remove_prefix, set")
        if any(not p for p in self.remove_prefix):
            raise ValueError("remove_prefix: an empty prefix would remove every header")
        return self


class Headers(Transform[HeadersConfig]):
    """Copies, removes and sets message headers (set values are CEL expressions)."""

    Config = HeadersConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self._copies = list(c.copy_.items())
        self._removes = list(c.remove)
        self._prefixes = tuple(c.remove_prefix)
        self._names = list(c.set_)
        self._plan = Plan([(f"set.{n}", e) for n, e in c.set_.items()])

    def process(self, messages: list[Message]) -> Sequence[Message | Rejected]:
        return each(messages, self._apply, "headers")

    def _apply(self, m: Message) -> Message:
        values = self._plan.values(Bindings(m)) if self._names else ()
        incoming = m.headers
        headers = dict(incoming)
        for source, target in self._copies:
            value = incoming.get(source)
            if value is not None:
                headers[target] = value
        for name in self._removes:
            headers.pop(name, None)
        if self._prefixes:
            prefixes = self._prefixes
            for name in [n for n in headers if n.startswith(prefixes)]:
                del headers[name]
        for name, value in zip(self._names, values, strict=True):
            if type(value) is not str:
                raise RejectedError(f"set.{name}: expected a string, the expression gave "
                                    f"{_json.kind(value)}; convert it with string()")
            headers[name] = value
        return Message(m.data, m.subject, m.key, headers, m.timestamp, m.id)
