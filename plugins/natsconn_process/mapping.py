"""``mapping``: reshape JSON payloads and set headers, subject and key from CEL.

Every expression sees the message as it came in (never a field another line
of the same mapping set). The payload is then built in a fixed order:

1. ``root`` (if given) replaces the document with its value;
2. ``rename`` moves fields;
3. ``remove`` deletes fields;
4. ``set`` writes the computed values (so a value set is never removed).

then written as JSON once. Headers: ``remove_headers``, then ``headers``.
A mapping that touches no field leaves the payload's bytes as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Self

from pydantic import Field, model_validator

from connector import (
    Bindings,
    Expr,
    Message,
    PluginConfig,
    Rejected,
    RejectedError,
    Transform,
)

from . import _json
from ._fields import FieldPath, KeyExpr, StringExpr, split_path
from ._plan import Plan, each


class MappingConfig(PluginConfig):
    root: Expr | None = Field(
        None, description="CEL expression whose value replaces the whole document, e.g. "
        "'{\"id\": data.id, \"amount\": data.amount}'; bytes become the payload as they are")
    rename: dict[FieldPath, FieldPath] = Field(
        default_factory=dict, description="fields to move, old path to new path "
        "(dotted paths into nested objects); a missing field is skipped")
    remove: list[FieldPath] = Field(default_factory=list,
                                    description="fields to delete; a missing field is skipped")
    set_: dict[FieldPath, Expr] = Field(
        default_factory=dict, alias="set", description="fields to write, path to CEL "
        "expression, e.g. {total: 'data.price * double(data.qty)'}; missing objects on the "
        "way are created")
    headers: dict[str, StringExpr] = Field(
        default_factory=dict, description="headers to set, name to CEL expression giving a "
        "string (a literal is quoted: '\"prod\"')")
    remove_headers: list[str] = Field(default_factory=list, description="headers to delete")
    subject: StringExpr | None = Field(
        None, description="CEL expression giving the new subject, e.g. "
        "'\"orders.\" + data.region'")
    key: KeyExpr | None = Field(
        None, description="CEL expression giving the new key (bytes, or a string written as "
        "UTF-8); null removes the key")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not (self.root or self.rename or self.remove or self.set_ or self.headers
                or self.remove_headers or self.subject or self.key):
            raise ValueError("a mapping needs at least one of root, rename, remove, set, "
                             "headers, remove_headers, subject, key")
        paths = sorted(self.set_, key=len)
        for i, shorter in enumerate(paths):
            for longer in paths[i + 1:]:
                if longer.startswith(shorter + "."):
                    raise ValueError(f"set: {shorter!r} and {longer!r} overlap; set the "
                                     f"whole of {shorter!r} or only fields inside it")
        return self


class Mapping(Transform[MappingConfig]):
    """Sets, renames and removes JSON fields, and sets headers, subject and key, from CEL."""

    Config = MappingConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        named: list[tuple[str, Any]] = []
        if c.root is not None:
            named.append(("root", c.root))
        self._sets: list[tuple[int, tuple[str, ...]]] = []
        for path, expr in c.set_.items():
            self._sets.append((len(named), split_path(path)))
            named.append((f"set.{path}", expr))
        self._headers: list[tuple[int, str]] = []
        for name, expr in c.headers.items():
            self._headers.append((len(named), name))
            named.append((f"headers.{name}", expr))
        self._subject = -1
        if c.subject is not None:
            self._subject = len(named)
            named.append(("subject", c.subject))
        self._key = -1
        if c.key is not None:
            self._key = len(named)
            named.append(("key", c.key))
        self._plan = Plan(named)
        self._root = c.root is not None
        self._renames = [(split_path(a), split_path(b)) for a, b in c.rename.items()]
        self._removes = [split_path(p) for p in c.remove]
        self._edits = bool(self._renames or self._removes or self._sets)
        self._document = self._root or self._edits
        self._needs_json = self._edits and not self._root
        # A root that is a constant or a per-subject memo is one object for many
        # messages: edit a copy of it.
        self._copy_root = self._root and self._edits and self._plan.shared(0)
        self._drop_headers = list(c.remove_headers)
        self._touch_headers = bool(self._headers or self._drop_headers)

    @property
    def cel_calls(self) -> int:
        """CEL evaluations per message (memoized per-subject ones included)."""
        return self._plan.calls

    def process(self, messages: list[Message]) -> Sequence[Message | Rejected]:
        return each(messages, self._apply, "mapping")

    def _apply(self, m: Message) -> Message:
        bindings = Bindings(m)
        if self._needs_json and type(bindings.data) is bytes:
            raise RejectedError("data is not JSON (set, rename and remove need a JSON object)")
        values = self._plan.values(bindings)
        data = m.data
        if self._document:
            data = self._build(bindings, values)
        headers = m.headers
        if self._touch_headers:
            headers = dict(headers)
            for name in self._drop_headers:
                headers.pop(name, None)
            for i, name in self._headers:
                value = values[i]
                if type(value) is not str:
                    raise RejectedError(f"headers.{name}: expected a string, the expression "
                                        f"gave {_json.kind(value)}; convert it with string()")
                headers[name] = value
        subject = m.subject
        if self._subject >= 0:
            subject = values[self._subject]
            if type(subject) is not str or not subject:
                raise RejectedError(f"subject: expected a non-empty string, the expression "
                                    f"gave {_json.kind(subject)} {subject!r}")
        key = m.key
        if self._key >= 0:
            given = values[self._key]
            if given is None or type(given) is bytes:
                key = given
            elif type(given) is str:
                key = given.encode()
            else:
                raise RejectedError(f"key: expected bytes or a string, the expression gave "
                                    f"{_json.kind(given)}")
        return Message(data, subject, key, headers, m.timestamp, m.id)

    def _build(self, bindings: Bindings, values: list[Any]) -> bytes:
        if self._root:
            doc = values[0]
            if self._copy_root:
                doc = copy.deepcopy(doc)
        else:
            doc = bindings.data
        if self._edits:
            if not isinstance(doc, dict):
                where = "root gave" if self._root else "data is"
                raise RejectedError(f"{where} {_json.kind(doc)}; set, rename and remove need "
                                    f"a JSON object")
            pop, put, missing = _json.pop, _json.put, _json.MISSING
            for source, target in self._renames:
                moved = pop(doc, source)
                if moved is not missing:
                    put(doc, target, moved)
            for path in self._removes:
                pop(doc, path)
            for i, path in self._sets:
                if len(path) == 1:
                    doc[path[0]] = values[i]
                else:
                    put(doc, path, values[i])
        elif type(doc) is bytes:
            return doc  # a root giving bytes is the payload itself
        return _json.dumps(doc)
