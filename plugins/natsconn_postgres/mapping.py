"""The sink's column mapping: which part of a message fills which column, and
how each value becomes what the column's type takes.

A column's source is one of ``data``, ``data.<path>`` (a field of the JSON
data: ``data.order.id``, ``data.items.0.sku``), ``subject``, ``key``,
``headers``, ``header.<Name>``, ``id``, ``timestamp``. Values are converted
here, per row, to the Python type asyncpg encodes for the column; a value
that cannot be converted rejects its row (and only its row) before anything
is sent.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import Field

from connector import Message, PluginConfig, RejectedError

KINDS = ("data", "subject", "key", "headers", "id", "timestamp")
_TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ,()\[\].\"]*$")

# The table natsconn creates when no `columns` are given.
DEFAULT_COLUMNS: dict[str, str] = {
    "id": "id",
    "subject": "subject",
    "key": "key",
    "headers": "headers",
    "data": "data",
    "timestamp": "timestamp",
}

# Column types for `create_table`, by source.
DEFAULT_TYPES: dict[str, str] = {
    "data": "bytea",
    "data_path": "jsonb",
    "subject": "text",
    "key": "bytea",
    "headers": "jsonb",
    "header": "text",
    "id": "text",
    "timestamp": "timestamptz",
}


class ColumnSpec(PluginConfig):
    """A column's source, and its type when natsconn creates the table."""

    source: str = Field(alias="from", description="data, data.<path>, subject, key, headers, "
                        "header.<Name>, id or timestamp")
    type: str | None = Field(None, description="SQL type for create_table; default by source "
                             "(data bytea, data.<path> jsonb, headers jsonb, timestamp "
                             "timestamptz, others text or bytea)")


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # data, data_path, subject, key, headers, header, id, timestamp
    path: tuple[str | int, ...] = ()
    header: str = ""

    @classmethod
    def parse(cls, text: str) -> Source:
        text = text.strip()
        if text in KINDS:
            return cls(text)
        if text.startswith("data."):
            tokens = text[5:].split(".")
            if any(not t for t in tokens):
                raise ValueError(f"empty step in JSON path {text!r}")
            return cls("data_path", tuple(int(t) if t.isdigit() else t for t in tokens))
        if text.startswith("header.") and len(text) > 7:
            return cls("header", header=text[7:])
        raise ValueError(f"expected data, data.<path>, subject, key, headers, header.<Name>, "
                         f"id or timestamp, found {text!r}")


def normalize_columns(value: Mapping[str, str | ColumnSpec | Mapping[str, Any]] | None
                      ) -> dict[str, ColumnSpec]:
    """Shorthand ``col: source`` and full ``col: {from: ..., type: ...}`` alike."""
    out: dict[str, ColumnSpec] = {}
    for name, spec in (value if value is not None else DEFAULT_COLUMNS).items():
        if isinstance(spec, str):
            spec = ColumnSpec.model_validate({"from": spec})
        elif not isinstance(spec, ColumnSpec):
            spec = ColumnSpec.model_validate(spec)
        Source.parse(spec.source)  # raises ValueError
        if spec.type is not None and not _TYPE_RE.match(spec.type):
            raise ValueError(f"column {name!r}: {spec.type!r} does not look like an SQL type")
        out[name] = spec
    if not out:
        raise ValueError("expected at least one column")
    return out


def default_type(spec: ColumnSpec) -> str:
    return spec.type or DEFAULT_TYPES[Source.parse(spec.source).kind]


# --------------------------------------------------------------- extraction

_MISSING = object()


def _walk(doc: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        if isinstance(step, int) and isinstance(doc, list):
            if step >= len(doc):
                return None
            doc = doc[step]
        elif isinstance(doc, dict):
            doc = doc.get(str(step), _MISSING)
            if doc is _MISSING:
                return None
        else:
            return None
    return doc


Extract = Callable[[Message, Any], Any]


def extractor(source: Source) -> Extract:
    """``f(message, parsed_json_data) -> value``; the JSON is parsed once per row."""
    kind = source.kind
    if kind == "data":
        return lambda m, doc: m.data
    if kind == "data_path":
        path = source.path
        return lambda m, doc: _walk(doc, path)
    if kind == "subject":
        return lambda m, doc: m.subject
    if kind == "key":
        return lambda m, doc: m.key
    if kind == "headers":
        return lambda m, doc: dict(m.headers)
    if kind == "header":
        name = source.header
        return lambda m, doc: m.headers.get(name)
    if kind == "id":
        return lambda m, doc: m.id
    if kind == "timestamp":
        return lambda m, doc: m.timestamp
    raise AssertionError(kind)


# --------------------------------------------------------------- conversion

def _text_of(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).decode("utf-8")  # strict: invalid UTF-8 rejects the row
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float | Decimal):
        return str(v)
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    return str(v)


def to_text(v: Any) -> Any:
    return None if v is None else _text_of(v)


def to_bytea(v: Any) -> Any:
    if v is None or isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    return _text_of(v).encode()


def to_json(v: Any) -> Any:
    """JSON text: bytes and bytearrays are taken as JSON already (the server
    checks them); other values are serialized (a string becomes a JSON string)."""
    if v is None:
        return None
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).decode("utf-8")
    if not v and isinstance(v, dict):
        return "{}"  # no headers: the common case, without json.dumps
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _int_conv(bits: int) -> Callable[[Any], Any]:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def conv(v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError(f"{v!r} is not an integer")
        if isinstance(v, int):
            n = v
        elif isinstance(v, float):
            if not v.is_integer():
                raise ValueError(f"{v!r} is not an integer")
            n = int(v)
        else:
            n = int(_text_of(v).strip())
        if not low <= n <= high:
            raise ValueError(f"{n} is out of range for a {bits}-bit integer")
        return n

    return conv


def to_float(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    if isinstance(v, int | float):
        return float(v)
    return float(_text_of(v).strip())


def to_numeric(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    try:
        return Decimal(_text_of(v).strip())
    except InvalidOperation:
        raise ValueError(f"{v!r} is not a number") from None


_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def to_bool(v: Any) -> Any:
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    text = _text_of(v).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{v!r} is not a boolean")


def _datetime(v: Any) -> dt.datetime:
    if isinstance(v, dt.datetime):
        moment = v
    elif isinstance(v, int | float) and not isinstance(v, bool):
        return dt.datetime.fromtimestamp(v, dt.UTC)
    else:
        moment = dt.datetime.fromisoformat(_text_of(v).strip())
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def to_timestamptz(v: Any) -> Any:
    return None if v is None else _datetime(v)


def to_timestamp(v: Any) -> Any:
    """``timestamp without time zone`` holds UTC wall time."""
    return None if v is None else _datetime(v).astimezone(dt.UTC).replace(tzinfo=None)


def to_date(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, str | bytes) and len(v) == 10:
        return dt.date.fromisoformat(_text_of(v))
    return _datetime(v).date()


def to_uuid(v: Any) -> Any:
    if v is None or isinstance(v, uuid.UUID):
        return v
    return uuid.UUID(_text_of(v).strip())


def identity(v: Any) -> Any:
    return v


_BY_TYPE: dict[str, Callable[[Any], Any]] = {
    "bytea": to_bytea,
    "json": to_json,
    "jsonb": to_json,
    "int2": _int_conv(16),
    "int4": _int_conv(32),
    "int8": _int_conv(64),
    "float4": to_float,
    "float8": to_float,
    "numeric": to_numeric,
    "bool": to_bool,
    "timestamptz": to_timestamptz,
    "timestamp": to_timestamp,
    "date": to_date,
    "uuid": to_uuid,
}


def converter(base_type: str, category: str) -> Callable[[Any], Any]:
    """How a value becomes what asyncpg encodes for a column of ``base_type``
    (the type's name in pg_type, domains resolved). Unknown types get text,
    which asyncpg sends in text format (enums, citext, inet, ...)."""
    if base_type in _BY_TYPE:
        return _BY_TYPE[base_type]
    if category == "A":  # arrays: a JSON array goes through as a list
        return identity
    return to_text


@dataclass(frozen=True, slots=True)
class TargetColumn:
    name: str
    sql_type: str  # format_type(): 'character varying(20)', 'jsonb', ...
    base_type: str  # pg_type.typname, domains resolved
    category: str  # pg_type.typcategory


class RowBuilder:
    """Turns messages into row tuples in the mapping's column order."""

    def __init__(self, columns: Mapping[str, ColumnSpec],
                 targets: Mapping[str, TargetColumn]) -> None:
        self.names = list(columns)
        self._steps: list[tuple[Extract, Callable[[Any], Any]]] = []
        needs_json = False
        for name, spec in columns.items():
            source = Source.parse(spec.source)
            needs_json = needs_json or source.kind == "data_path"
            target = targets[name]
            conv = converter(target.base_type, target.category)
            if conv is to_bytea and source.kind in ("data", "key"):
                conv = identity  # bytes | None already
            elif conv is to_text and source.kind in ("subject", "id", "header"):
                conv = identity  # str | None already
            self._steps.append((extractor(source), conv))
        self._funcs = [
            _message_time if (Source.parse(spec.source).kind == "timestamp"
                              and c is to_timestamptz) else _compose(e, c)
            for spec, (e, c) in zip(columns.values(), self._steps, strict=True)]
        self._needs_json = needs_json

    def rows(self, messages: Sequence[Message]
             ) -> tuple[list[tuple[Any, ...]], list[int], dict[int, RejectedError]]:
        """``(rows, positions, rejected)``: ``positions[i]`` is the index in
        ``messages`` of ``rows[i]``; rows that could not be built are in
        ``rejected`` by message index."""
        rows: list[tuple[Any, ...]] = []
        positions: list[int] = []
        rejected: dict[int, RejectedError] = {}
        funcs = self._funcs
        needs_json = self._needs_json
        for index, m in enumerate(messages):
            doc: Any = None
            if needs_json:
                try:
                    doc = json.loads(m.data)
                except ValueError as exc:
                    rejected[index] = RejectedError(f"data is not JSON ({exc}), but columns "
                                                    "take fields from it")
                    continue
            try:
                rows.append(tuple([f(m, doc) for f in funcs]))
            except (ValueError, TypeError, ArithmeticError):
                rejected[index] = self._which(m, doc)
                continue
            positions.append(index)
        return rows, positions, rejected

    def _which(self, m: Message, doc: Any) -> RejectedError:
        """The error of the first column that cannot take its value (the slow path)."""
        for name, f in zip(self.names, self._funcs, strict=True):
            try:
                f(m, doc)
            except (ValueError, TypeError, ArithmeticError) as exc:
                return RejectedError(f"column {name!r}: {exc}")
        return RejectedError("a column could not take its value")


_from_epoch = dt.datetime.fromtimestamp


def _message_time(m: Message, _doc: Any) -> dt.datetime | None:
    """``timestamp`` into timestamptz in one call: the sink's default mapping
    converts it for every row (``Message.timestamp`` is epoch seconds or None)."""
    t = m.timestamp
    return None if t is None else _from_epoch(t, dt.UTC)


def _compose(extract: Extract, conv: Callable[[Any], Any]) -> Extract:
    if conv is identity:
        return extract
    return lambda m, doc: conv(extract(m, doc))
