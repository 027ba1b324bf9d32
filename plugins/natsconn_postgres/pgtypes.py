"""Text-format column values (as pgoutput sends them) to JSON values.

The replication session runs with ``DateStyle=ISO``, ``TimeZone=UTC``,
``IntervalStyle=iso_8601``, ``bytea_output=hex`` and ``extra_float_digits=3``,
so the text forms below are the only ones to expect:

=====================  ==========================================================
int2, int4, int8, oid  JSON integer
float4, float8         JSON number; ``NaN``, ``Infinity``, ``-Infinity`` as strings
numeric                string (exact; ``numeric: number`` gives a JSON number,
                       which a consumer may read as a binary float)
bool                   true / false
json, jsonb            the parsed JSON value
bytea                  base64 string
timestamp(tz)          ISO 8601: ``2024-05-01T12:00:00.5+00:00`` (``infinity`` as is)
arrays                 JSON arrays (nested for several dimensions), elements mapped
                       by the same rules; a lower bound other than 1 is dropped
everything else        the text form as a string (date, time, interval, uuid, …)
NULL                   null
=====================  ==========================================================
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

Convert = Callable[[str], Any]


def _int(text: str) -> Any:
    return int(text)


def _float(text: str) -> Any:
    if text in ("NaN", "Infinity", "-Infinity"):
        return text
    return float(text)


def _numeric_number(text: str) -> Any:
    if text in ("NaN", "Infinity", "-Infinity"):
        return text
    if "." in text or "e" in text or "E" in text:
        return float(text)
    return int(text)


def _text(text: str) -> Any:
    return text


def _bool(text: str) -> Any:
    return text == "t"


def _json(text: str) -> Any:
    return orjson.loads(text)


def _bytea(text: str) -> Any:
    if text.startswith("\\x"):
        return base64.b64encode(bytes.fromhex(text[2:])).decode("ascii")
    return base64.b64encode(text.encode("latin-1")).decode("ascii")  # escape format: rare


def _timestamp(text: str) -> Any:
    # 2024-05-01 12:00:00.5+00 -> 2024-05-01T12:00:00.5+00:00
    if len(text) < 19 or text[10] != " ":
        return text  # infinity, -infinity
    out = text[:10] + "T" + text[11:]
    sign = max(out.rfind("+", 19), out.rfind("-", 19))
    if sign > 0 and len(out) - sign == 3:
        out += ":00"
    return out


_BY_NAME: dict[str, Convert] = {
    "int2": _int, "int4": _int, "int8": _int, "oid": _int, "xid": _int, "cid": _int,
    "float4": _float, "float8": _float,
    "bool": _bool,
    "json": _json, "jsonb": _json,
    "bytea": _bytea,
    "timestamp": _timestamp, "timestamptz": _timestamp,
}

# Built-in types by OID (pg_type.h): name, element OID for arrays (0 otherwise).
BUILTIN: dict[int, tuple[str, int]] = {
    16: ("bool", 0), 17: ("bytea", 0), 18: ("char", 0), 19: ("name", 0), 20: ("int8", 0),
    21: ("int2", 0), 23: ("int4", 0), 25: ("text", 0), 26: ("oid", 0), 114: ("json", 0),
    142: ("xml", 0), 700: ("float4", 0), 701: ("float8", 0), 790: ("money", 0),
    1042: ("bpchar", 0), 1043: ("varchar", 0), 1082: ("date", 0), 1083: ("time", 0),
    1114: ("timestamp", 0), 1184: ("timestamptz", 0), 1186: ("interval", 0),
    1266: ("timetz", 0), 1560: ("bit", 0), 1562: ("varbit", 0), 1700: ("numeric", 0),
    2950: ("uuid", 0), 3802: ("jsonb", 0), 869: ("inet", 0), 650: ("cidr", 0),
    829: ("macaddr", 0),
    1000: ("_bool", 16), 1001: ("_bytea", 17), 1005: ("_int2", 21), 1007: ("_int4", 23),
    1016: ("_int8", 20), 1009: ("_text", 25), 1015: ("_varchar", 1043),
    1014: ("_bpchar", 1042), 1021: ("_float4", 700), 1022: ("_float8", 701),
    1231: ("_numeric", 1700), 2951: ("_uuid", 2950), 199: ("_json", 114),
    3807: ("_jsonb", 3802), 1115: ("_timestamp", 1114), 1185: ("_timestamptz", 1184),
    1182: ("_date", 1082), 1183: ("_time", 1083), 1028: ("_oid", 26),
}


def parse_array(text: str, element: Convert) -> list[Any]:
    """``{1,2,NULL}``, ``{"a b","c\\"d"}``, ``{{1,2},{3,4}}``, ``[0:1]={7,8}``."""
    if text.startswith("["):
        text = text[text.index("=") + 1:]
    if not text.startswith("{"):
        raise ValueError(f"not an array literal: {text[:40]!r}")
    out, end = _array_at(text, 0, element)
    if text[end:].strip():
        raise ValueError(f"trailing text after array literal: {text[end:end + 20]!r}")
    return out


def _array_at(s: str, i: int, element: Convert) -> tuple[list[Any], int]:
    out: list[Any] = []
    i += 1  # past {
    if s[i] == "}":
        return out, i + 1
    n = len(s)
    while True:
        c = s[i]
        if c == "{":
            sub, i = _array_at(s, i, element)
            out.append(sub)
        elif c == '"':
            j = i + 1
            parts: list[str] = []
            start = j
            while s[j] != '"':
                if s[j] == "\\":
                    parts.append(s[start:j])
                    j += 1
                    start = j
                j += 1
            parts.append(s[start:j])
            out.append(element("".join(parts)))
            i = j + 1
        else:
            j = i
            while j < n and s[j] != "," and s[j] != "}":
                j += 1
            token = s[i:j].strip()
            out.append(None if token == "NULL" else element(token))
            i = j
        if s[i] == ",":
            i += 1
            continue
        if s[i] == "}":
            return out, i + 1
        raise ValueError(f"unexpected {s[i]!r} in array literal at {i}")


@dataclass(slots=True, frozen=True)
class PgType:
    name: str  # as reported in messages: typname, schema-qualified outside pg_catalog
    convert: Convert


class TypeRegistry:
    """OID -> name and converter. Seeded with the built-ins; ``load`` adds what
    ``pg_type`` holds (domains resolve to their base type's converter, arrays to
    their element's); pgoutput's Type messages add types created later."""

    def __init__(self, *, numeric_as_number: bool = False) -> None:
        self._numeric = _numeric_number if numeric_as_number else _text
        # oid -> (name, category, element oid, base oid)
        self._rows: dict[int, tuple[str, str, int, int]] = {
            oid: (name, "A" if elem else "", elem, 0) for oid, (name, elem) in BUILTIN.items()}
        self._cache: dict[int, PgType] = {}

    def load(self, rows: list[tuple[int, str, str, int, int]]) -> None:
        """Rows of ``SELECT oid, name, typcategory, typelem, typbasetype FROM pg_type``."""
        for oid, name, category, elem, base in rows:
            self._rows[oid] = (name, category, elem, base)
        self._cache.clear()

    def add(self, oid: int, schema: str, name: str) -> None:
        """A type announced by a pgoutput Type message."""
        if oid not in self._rows:
            qualified = name if schema in ("pg_catalog", "public", "") else f"{schema}.{name}"
            self._rows[oid] = (qualified, "", 0, 0)
            self._cache.pop(oid, None)

    def get(self, oid: int) -> PgType:
        found = self._cache.get(oid)
        if found is None:
            found = self._cache[oid] = self._build(oid, 0)
        return found

    def _build(self, oid: int, depth: int) -> PgType:
        row = self._rows.get(oid)
        if row is None:
            return PgType(f"oid:{oid}", _text)
        name, category, elem, base = row
        if depth > 8:
            return PgType(name, _text)
        if base:
            return PgType(name, self._build(base, depth + 1).convert)
        if elem and (category == "A" or name.startswith("_")):
            element = self._build(elem, depth + 1).convert

            def convert_array(text: str, element: Convert = element) -> Any:
                return parse_array(text, element)
            return PgType(name, convert_array)
        if name == "numeric":
            return PgType(name, self._numeric)
        return PgType(name, _BY_NAME.get(name, _text))
