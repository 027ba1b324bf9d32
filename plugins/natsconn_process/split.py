"""``split``: one message holding a JSON array becomes one message per element.

Each derived message keeps the source message's subject, key, headers and
timestamp, and gets the id ``<source id>/<index>``, so sinks that deduplicate
by id (JetStream, PostgreSQL upserts) write a redelivered source's elements
once. The engine counts the derived messages against their source batch:
the source is acknowledged only when every element is written or
dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import Field

from connector import Message, PluginConfig, Rejected, Transform

from . import _json
from ._fields import FieldPath, split_path

INDEX_HEADER = "Natsconn-Split-Index"
COUNT_HEADER = "Natsconn-Split-Count"


class SplitConfig(PluginConfig):
    path: FieldPath | None = Field(
        None, description="dotted path to the array inside a JSON object, e.g. 'order.items'; "
        "unset: the whole document is the array")
    headers: bool = Field(
        True, description="add Natsconn-Split-Index (from 0) and Natsconn-Split-Count to each "
        "derived message")


class Split(Transform[SplitConfig]):
    """Splits a message holding a JSON array into one message per element."""

    Config = SplitConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._path = split_path(self.config.path) if self.config.path else None
        self._where = f"at {self.config.path!r}" if self.config.path else "as the document"

    def process(self, messages: list[Message]) -> Sequence[Message | Rejected]:
        out: list[Message | Rejected] = []
        append, extend = out.append, out.extend
        path, dumps, loads = self._path, orjson.dumps, orjson.loads
        numbered = self.config.headers
        empty = 0
        for m in messages:
            try:
                doc = loads(m.data)
            except orjson.JSONDecodeError:
                append(Rejected(m, "split: data is not JSON"))
                continue
            items = doc if path is None else _json.get(doc, path)
            if type(items) is not list:
                found = "nothing" if items is _json.MISSING else _json.kind(items)
                append(Rejected(m, f"split: expected a JSON array {self._where}, found {found}"))
                continue
            if not items:
                empty += 1
                continue
            subject, key, headers, ts, base = m.subject, m.key, m.headers, m.timestamp, m.id
            if numbered:
                count = str(len(items))
                extend([
                    Message(dumps(item), subject, key,
                            {**headers, INDEX_HEADER: str(i), COUNT_HEADER: count}, ts,
                            None if base is None else f"{base}/{i}")
                    for i, item in enumerate(items)
                ])
            else:
                extend([
                    Message(dumps(item), subject, key, headers, ts,
                            None if base is None else f"{base}/{i}")
                    for i, item in enumerate(items)
                ])
        if empty:
            self.context.meters.filtered(empty)
        return out
