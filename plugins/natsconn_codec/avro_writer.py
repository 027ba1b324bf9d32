"""A faster Avro binary writer for the schemas JSON payloads usually have.

fastavro's ``schemaless_writer`` spends about 0.4 µs a field re-reading the
schema for every record, and it coerces instead of refusing (any object is a
boolean, ``1.7`` an int, ``"1"`` a double). This module compiles a schema once
into nested closures that check each value's JSON type and append its
encoding to a ``bytearray``: about half fastavro's time for a 10-field record,
type checks included (tests/unit/test_codec_avro.py checks the bytes are
fastavro's).

It covers null, boolean, int, long, float, double, string, bytes, records,
arrays, maps, enums and unions whose branches take different JSON types
(``["null", X]`` above all). :func:`compile_writer` raises :class:`Unsupported`
for anything else (fixed, logical types, unions fastavro resolves by
validating each branch), and the codec uses fastavro for that schema.

Field semantics are fastavro's: a missing field takes its default; a missing
field without a default is written as null when the type is nullable and
refused otherwise; keys the schema does not have are not written.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

Write = Callable[[Any, bytearray], None]

_MISSING = object()
_pack_double = struct.Struct("<d").pack
_pack_float = struct.Struct("<f").pack
_SMALL = [bytes((i,)) for i in range(128)]
_LONG = (-(1 << 63), (1 << 63) - 1)
_INT = (-(1 << 31), (1 << 31) - 1)


class Unsupported(Exception):
    """The schema has a part this writer does not do; use fastavro for it."""


class Misfit(Exception):
    """A value does not fit the schema; the text names the field."""


def _varint_source() -> str:
    """``zigzag_varint`` unrolled: one comparison chain and one ``bytes(...)`` per
    length (a loop costs ~0.7 µs for an epoch-milliseconds timestamp)."""
    lines = ["def zigzag_varint(n):",
             "    n = (n << 1) ^ (n >> 63)",
             "    if n < 0x80:",
             "        return SMALL[n]"]
    for size in range(2, 11):
        parts = [f"n >> {7 * i} & 0x7F | 0x80" if i else "n & 0x7F | 0x80"
                 for i in range(size - 1)]
        parts.append(f"n >> {7 * (size - 1)}")
        test = f"    if n < {1 << (7 * size)}:" if size < 10 else "    if True:"
        lines += [test, f"        return bytes(({', '.join(parts)}))"]
    return "\n".join(lines) + "\n"


_namespace: dict[str, Any] = {"SMALL": _SMALL}
exec(_varint_source(), _namespace)  # generated from constants above
zigzag_varint: Callable[[int], bytes] = _namespace["zigzag_varint"]
zigzag_varint.__doc__ = "Avro's int/long encoding: zigzag, then a little-endian base-128 varint."


def _misfit(path: str, expected: str, value: Any) -> Misfit:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return Misfit(f"field {path}: expected {expected}, found {shown} ({type(value).__name__})")


def compile_writer(schema: Any, named: dict[str, Any], path: str) -> Write:
    """``write(value, out)`` for a fastavro-parsed ``schema``; raises :class:`Unsupported`."""
    return _Compiler(named).build(schema, path)


class _Lazy:
    """A record's writer, named before it is built (recursive types)."""

    __slots__ = ("fn",)

    def __init__(self) -> None:
        self.fn: Write | None = None

    def __call__(self, value: Any, out: bytearray) -> None:
        assert self.fn is not None
        self.fn(value, out)


class _Compiler:
    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.building: dict[str, _Lazy] = {}  # records being built: a recursive use

    def build(self, schema: Any, path: str) -> Write:
        if isinstance(schema, str):
            if schema in self.named:
                return self.build(self.named[schema], path)
            return _primitive(schema, path)
        if isinstance(schema, list):
            return self.union(schema, path)
        if not isinstance(schema, dict):
            raise Unsupported
        if schema.get("logicalType") is not None:
            return _logical(schema, path)
        kind = schema.get("type")
        if kind == "record":
            return self.record(schema, path)
        if kind == "array":
            return _array(self.build(schema.get("items"), f"{path}[]"), path)
        if kind == "map":
            return _map(self.build(schema.get("values"), f"{path}{{}}"), path)
        if kind == "enum":
            return _enum(list(schema.get("symbols", ())), path)
        if isinstance(kind, str) and kind in _PRIMITIVES:
            return _primitive(kind, path)
        raise Unsupported

    def union(self, branches: list[Any], path: str) -> Write:
        lookup: dict[type, tuple[bytes, Write]] = {}
        names = []
        for i, branch in enumerate(branches):
            classes = self.accepts(branch)
            if classes is None or any(c in lookup for c in classes):
                raise Unsupported  # two branches for one JSON type: fastavro validates
            entry = (zigzag_varint(i), self.build(branch, path))
            for c in classes:
                lookup[c] = entry
            names.append(_UNION_NAMES.get(classes[0], classes[0].__name__))
        if float in lookup and int not in lookup:
            lookup[int] = lookup[float]  # as fastavro: an integer fits a double
        kinds = ", ".join(names)

        def union(value: Any, out: bytearray) -> None:
            hit = lookup.get(value.__class__)
            if hit is None:
                raise _misfit(path, f"one of the union's types ({kinds})", value)
            out += hit[0]
            hit[1](value, out)
        return union

    def accepts(self, schema: Any) -> tuple[type, ...] | None:
        """The Python classes (after the codec's conversions) a branch takes."""
        if isinstance(schema, str) and schema in self.named:
            schema = self.named[schema]
        if isinstance(schema, dict):
            logical = schema.get("logicalType")
            if logical is not None:
                return _LOGICAL_CLASSES.get((schema.get("type"), logical))
            schema = schema.get("type")
        return _CLASSES.get(schema) if isinstance(schema, str) else None

    def inline_kind(self, schema: Any) -> str | None:
        """The primitive the generated record code writes itself, if any."""
        if isinstance(schema, str) and schema in self.named:
            schema = self.named[schema]
        if isinstance(schema, dict) and schema.get("logicalType") is None:
            schema = schema.get("type")
        return schema if schema in ("string", "int", "long", "double", "boolean") else None

    def record(self, schema: dict[str, Any], path: str) -> Write:
        # Built once per place it is used, so errors name the field path; a
        # recursive use takes the writer being built.
        name = str(schema.get("name"))
        hit = self.building.get(name)
        if hit is not None:
            return hit
        lazy = _Lazy()
        self.building[name] = lazy
        fields: list[tuple[str, Write, bytes | None, str]] = []
        for f in schema.get("fields", ()):
            fpath = f"{path}.{f['name']}"
            ftype = f["type"]
            write = self.build(ftype, fpath)
            default: bytes | None = None
            if "default" in f:
                encoded = bytearray()
                try:
                    if isinstance(ftype, list):  # a union's default is of its first branch
                        encoded += b"\x00"
                        self.build(ftype[0], fpath)(f["default"], encoded)
                    else:
                        write(f["default"], encoded)
                except Misfit:
                    raise Unsupported from None  # e.g. a bytes default in Avro's JSON form
                default = bytes(encoded)
            elif isinstance(ftype, list) and "null" in ftype:
                default = zigzag_varint(ftype.index("null"))  # fastavro writes null
            fields.append((f["name"], write, default, fpath))
        record = _record_function(fields, [self.inline_kind(f["type"])
                                           for f in schema.get("fields", ())], path)
        lazy.fn = record
        del self.building[name]
        return record


def _record_function(fields: list[tuple[str, Write, bytes | None, str]],
                     kinds: list[str | None], path: str) -> Write:
    """A record's writer as one generated function: each field's lookup, check
    and encoding inline for strings, ints, longs, doubles and booleans, a call
    to its compiled writer for the rest (about 30 % faster than a loop over
    closures). Names and paths enter the code only as ``repr`` literals."""
    env: dict[str, Any] = {"MISSING": _MISSING, "Misfit": Misfit, "misfit": _misfit,
                           "SMALL": _SMALL, "zz": zigzag_varint, "pack_double": _pack_double,
                           "PATH": path}
    lines = ["def record(value, out):",
             "    if value.__class__ is not dict:",
             "        raise misfit(PATH, 'a record (JSON object)', value)",
             "    get = value.get"]
    for i, ((name, write, default, fpath), kind) in enumerate(zip(fields, kinds, strict=True)):
        env[f"W{i}"], env[f"D{i}"] = write, default
        lines += [f"    x = get({name!r}, MISSING)", "    if x is MISSING:"]
        if default is None:
            lines.append(f"        raise Misfit({f'field {fpath}: no value and no default'!r})")
        else:
            lines.append(f"        out += D{i}")
        if kind == "string":
            lines += ["    elif x.__class__ is str:",
                      "        b = x.encode()",
                      "        n = len(b)",
                      "        out += SMALL[n << 1] if n < 64 else zz(n)",
                      "        out += b"]
        elif kind in ("int", "long"):
            low, high = _LONG if kind == "long" else _INT
            lines += [f"    elif x.__class__ is int and {low} <= x <= {high}:",
                      "        out += zz(x)"]
        elif kind == "double":
            lines += ["    elif x.__class__ is float or x.__class__ is int:",
                      "        out += pack_double(x)"]
        elif kind == "boolean":
            lines += ["    elif x is True:", "        out += b'\\x01'",
                      "    elif x is False:", "        out += b'\\x00'"]
        if kind is None:
            lines += ["    else:", f"        W{i}(x, out)"]
        else:
            lines += ["    else:", f"        W{i}(x, out)  # raises the misfit"]
    exec("\n".join(lines) + "\n", env)  # names and paths enter only as repr literals
    function: Write = env["record"]
    return function


_CLASSES: dict[str, tuple[type, ...]] = {
    "null": (type(None),), "boolean": (bool,), "int": (int,), "long": (int,),
    "float": (float,), "double": (float,), "string": (str,), "enum": (str,),
    "bytes": (bytes,), "record": (dict,), "map": (dict,), "array": (list,)}
_UNION_NAMES = {type(None): "null", bool: "boolean", int: "integer", float: "number",
                str: "string", bytes: "bytes", dict: "object", list: "array",
                datetime: "timestamp", date: "date", time: "time", Decimal: "decimal"}
# After the codec's conversions (codecs.avro_converter): strings became these objects.
_LOGICAL_CLASSES: dict[tuple[Any, Any], tuple[type, ...]] = {
    ("long", "timestamp-millis"): (datetime, int), ("long", "timestamp-micros"): (datetime, int),
    ("long", "local-timestamp-millis"): (datetime, int),
    ("long", "local-timestamp-micros"): (datetime, int),
    ("int", "date"): (date, int), ("int", "time-millis"): (time, int),
    ("long", "time-micros"): (time, int), ("bytes", "decimal"): (Decimal,),
    ("string", "uuid"): (str,)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_EPOCH_DAY = date(1970, 1, 1)


def _logical(schema: dict[str, Any], path: str) -> Write:
    """timestamps, dates, times and bytes decimals, as fastavro writes them;
    values arrive converted (datetime, date, time, Decimal) or as Avro's numbers."""
    kind, logical = schema.get("type"), str(schema.get("logicalType"))
    if (kind, logical) not in _LOGICAL_CLASSES:
        raise Unsupported  # fixed decimals, durations, unknown logical types
    if logical == "uuid":
        return _primitive("string", path)
    if logical == "decimal":
        scale = int(schema.get("scale", 0))

        def decimal(value: Any, out: bytearray) -> None:
            if value.__class__ is not Decimal:
                raise _misfit(path, "a decimal", value)
            sign, digits, exponent = value.as_tuple()
            if not isinstance(exponent, int) or exponent + scale < 0:
                raise _misfit(path, f"a decimal with at most {scale} place(s)", value)
            unscaled = 0
            for digit in digits:
                unscaled = unscaled * 10 + digit
            unscaled *= 10 ** (exponent + scale)
            if sign:
                unscaled = -unscaled
            data = unscaled.to_bytes((unscaled.bit_length() + 8) // 8, "big", signed=True)
            out += zigzag_varint(len(data))
            out += data
        return decimal
    low, high = _LONG if kind == "long" else _INT
    if logical in ("date", "time-millis", "time-micros"):
        if logical == "date":
            def convert(value: Any) -> int:
                return int((value - _EPOCH_DAY).days)
            cls: type = date
        else:
            unit = 1000 if logical == "time-millis" else 1

            def convert(value: Any) -> int:
                micros: int = (((value.hour * 60 + value.minute) * 60 + value.second)
                               * 1_000_000 + value.microsecond)
                return micros // unit
            cls = time
    else:
        per_second = 1000 if logical.endswith("millis") else 1_000_000
        div = 1000 if per_second == 1000 else 1
        local = logical.startswith("local-")

        def convert(value: Any) -> int:
            epoch = _EPOCH if value.tzinfo is not None and not local else _EPOCH_NAIVE
            if value.tzinfo is not None and local:
                value = value.replace(tzinfo=None)
            delta: timedelta = value - epoch
            return ((delta.days * 86400 + delta.seconds) * per_second
                    + delta.microseconds // div)
        cls = datetime

    def logical_value(value: Any, out: bytearray) -> None:
        if value.__class__ is int:
            number = value
        elif value.__class__ is cls:
            number = convert(value)
        else:
            raise _misfit(path, f"{logical} ({cls.__name__} or a number)", value)
        if not low <= number <= high:
            raise _misfit(path, f"{logical} within the {kind} range", value)
        out += zigzag_varint(number)
    return logical_value


_PRIMITIVES = frozenset(("null", "boolean", "int", "long", "float", "double", "string",
                         "bytes"))


def _primitive(kind: str, path: str) -> Write:
    if kind == "string":
        def string(value: Any, out: bytearray) -> None:
            if value.__class__ is not str:
                raise _misfit(path, "string", value)
            data = value.encode()
            n = len(data)
            out += _SMALL[n << 1] if n < 64 else zigzag_varint(n)
            out += data
        return string
    if kind in ("int", "long"):
        low, high = _LONG if kind == "long" else _INT

        def integer(value: Any, out: bytearray) -> None:
            if value.__class__ is not int or not low <= value <= high:
                raise _misfit(path, kind, value)
            out += zigzag_varint(value)
        return integer
    if kind in ("float", "double"):
        pack = _pack_double if kind == "double" else _pack_float

        def number(value: Any, out: bytearray) -> None:
            cls = value.__class__
            if cls is not float and cls is not int:
                raise _misfit(path, kind, value)
            try:
                out += pack(value)
            except (OverflowError, struct.error):
                raise _misfit(path, f"a {kind} in range", value) from None
        return number
    if kind == "boolean":
        def boolean(value: Any, out: bytearray) -> None:
            if value is True:
                out += b"\x01"
            elif value is False:
                out += b"\x00"
            else:
                raise _misfit(path, "boolean", value)
        return boolean
    if kind == "null":
        def null(value: Any, out: bytearray) -> None:
            if value is not None:
                raise _misfit(path, "null", value)
        return null
    if kind == "bytes":
        def data(value: Any, out: bytearray) -> None:
            if value.__class__ is not bytes:
                raise _misfit(path, "bytes (base64 text)", value)
            out += zigzag_varint(len(value))
            out += value
        return data
    raise Unsupported


def _array(item: Write, path: str) -> Write:
    def array(value: Any, out: bytearray) -> None:
        if value.__class__ is not list:
            raise _misfit(path, "array", value)
        if value:
            out += zigzag_varint(len(value))
            for v in value:
                item(v, out)
        out += b"\x00"
    return array


def _map(item: Write, path: str) -> Write:
    def amap(value: Any, out: bytearray) -> None:
        if value.__class__ is not dict:
            raise _misfit(path, "map (JSON object)", value)
        if value:
            out += zigzag_varint(len(value))
            for k, v in value.items():
                key = k.encode()
                out += zigzag_varint(len(key))
                out += key
                item(v, out)
        out += b"\x00"
    return amap


def _enum(symbols: list[str], path: str) -> Write:
    index = {s: zigzag_varint(i) for i, s in enumerate(symbols)}
    shown = ", ".join(symbols[:10]) + (", ..." if len(symbols) > 10 else "")

    def enum(value: Any, out: bytearray) -> None:
        code = index.get(value) if value.__class__ is str else None
        if code is None:
            raise _misfit(path, f"one of the symbols {shown}", value)
        out += code
    return enum
