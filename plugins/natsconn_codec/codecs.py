"""The formats: each codec turns its payload into JSON bytes and back.

JSON is the pipeline's common representation (expressions see ``data`` as
parsed JSON), so ``to_json`` is decode and ``from_json`` is encode. Schemas
are parsed once, when a codec is built; a payload that does not fit raises
:class:`RejectedError` with the codec's reason.

How values map to JSON (docs/plugins/codec.md has the table):

- Avro ``bytes`` and ``fixed``: base64 strings. ``decimal``: a string of the
  exact value (``"12.50"``); encode also takes a number. ``timestamp-*``: an
  RFC 3339 string in UTC (``"2024-05-01T12:00:00.123Z"``, microseconds when
  there are any); ``local-timestamp-*`` the same without the zone; ``date``:
  ``"2024-05-01"``; ``time-*``: ``"12:00:00.123"``; ``uuid``: its string.
  Encode takes these strings, or the raw numbers Avro stores (epoch
  millis/micros, days, ...). Unions are untagged: the value itself, the
  branch picked by its type.
- Protobuf: the proto3 JSON mapping (``google.protobuf.json_format``): 64-bit
  integers as strings (encode takes strings or numbers), ``bytes`` base64,
  enums by name, well-known types by their JSON forms; fields at their default
  value are printed, so a record round-trips field by field.
- MessagePack: ``bin`` as base64 strings, the timestamp extension as an RFC 3339
  string, integer map keys as strings; other extension types are rejected.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import os
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import fastavro
import msgpack
import orjson
from fastavro.validation import ValidationError as AvroValidationError
from fastavro.validation import validate as avro_validate
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal.type_checkers import ToShortestFloat
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from connector import RejectedError

from .avro_writer import Misfit, Unsupported, Write, compile_writer

# ---------------------------------------------------------------------- JSON out

_DUMPS_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME
_DUMPS_OPTIONS_MSGPACK = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS


def _json_default(value: Any) -> Any:
    """What orjson does not write the way we want (it writes UUIDs itself)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        # Milliseconds unless the value has microseconds; UTC as Z.
        spec = "microseconds" if value.microsecond % 1000 else "milliseconds"
        text = value.isoformat(timespec=spec)
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, time):
        return value.isoformat(timespec="microseconds" if value.microsecond % 1000
                               else "milliseconds")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _dumps(value: Any, option: int = _DUMPS_OPTIONS) -> bytes:
    try:
        return orjson.dumps(value, default=_json_default, option=option)
    except orjson.JSONEncodeError as exc:
        raise RejectedError(f"decoded value has no JSON form: {exc}") from None


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RejectedError(f"data is not JSON: {exc}") from None


# ---------------------------------------------------------------------- JSON


class JsonCodec:
    """JSON stays JSON: decode and encode check that the payload parses."""

    name = "json"

    def to_json(self, data: bytes, offset: int = 0) -> bytes:
        body = data[offset:] if offset else data
        _loads(body)
        return body

    def from_json(self, data: bytes) -> bytes:
        _loads(data)
        return data


# ---------------------------------------------------------------------- MessagePack


class _ExtType(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _no_ext(code: int, _data: bytes) -> Any:
    raise _ExtType(code)


class MsgpackCodec:
    name = "msgpack"

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def to_json(self, data: bytes, offset: int = 0) -> bytes:
        try:
            value = msgpack.unpackb(memoryview(data)[offset:] if offset else data, raw=False,
                                    strict_map_key=False, timestamp=3, ext_hook=_no_ext)
        except _ExtType as exc:
            raise RejectedError(f"MessagePack extension type {exc.code} has no JSON form") \
                from None
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            # ExtraData and FormatError are ValueErrors; invalid UTF-8 in a str too.
            raise RejectedError(f"payload is not MessagePack: {type(exc).__name__}: {exc}") \
                from None
        return _dumps(value, _DUMPS_OPTIONS_MSGPACK)

    def from_json(self, data: bytes) -> bytes:
        return self._packer.pack(_loads(data))  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- Avro


def _file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def _missing_file(path: str, what: str) -> ValueError:
    return ValueError(f"expected {what} at {path!r}, found no such file (relative paths are "
                      f"taken from the working directory, {os.getcwd()})")


def load_avro_schema(path: str) -> tuple[dict[str, Any] | str | list[Any], str]:
    """A ``.avsc`` file parsed by fastavro, and its compact JSON text (what a
    registry is given). Raises ``ValueError`` saying what is wrong."""
    if not Path(path).is_file():
        raise _missing_file(path, "an Avro schema file (.avsc)")
    return _load_avro_cached(*_file_key(path))


@functools.lru_cache(maxsize=64)
def _load_avro_cached(path: str, _mtime: int, _size: int) -> tuple[Any, str]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"expected a readable Avro schema file at {path!r}, found: {exc}") \
            from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected an Avro schema (JSON) in {path!r}, found invalid JSON at "
                         f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return parse_avro(raw, f"in {path!r}"), json.dumps(raw, separators=(",", ":"))


def parse_avro(raw: Any, where: str, named: dict[str, Any] | None = None) -> Any:
    try:
        return fastavro.parse_schema(raw, named_schemas=named)
    except Exception as exc:  # SchemaParseException, UnknownType, KeyError, TypeError ...
        raise ValueError(f"expected a valid Avro schema {where}, found: "
                         f"{type(exc).__name__}: {exc}") from None


def avro_name(schema: Any) -> str | None:
    """The full name of a named top-level schema (record, enum, fixed)."""
    if isinstance(schema, dict) and isinstance(schema.get("name"), str):
        return str(schema["name"])
    return None


class _Bad(Exception):
    pass


Convert = Callable[[Any], Any]


class _Ref:
    """A converter named before it is built (recursive named types)."""

    __slots__ = ("fn",)

    def __init__(self) -> None:
        self.fn: Convert | None = None

    def __call__(self, value: Any) -> Any:
        return value if self.fn is None else self.fn(value)


def _bad(path: str, expected: str, value: Any) -> _Bad:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return _Bad(f"field {path}: expected {expected}, found {shown} ({type(value).__name__})")


def _convert_bytes(path: str) -> Convert:
    def conv(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise _bad(path, "base64 text", value) from None
        return value
    return conv


def _convert_decimal(path: str, precision: int, scale: int) -> Convert:
    def conv(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                result = Decimal(value)
            except InvalidOperation:
                raise _bad(path, "a decimal number (as a string or a number)", value) from None
        elif isinstance(value, int):
            result = Decimal(value)
        elif isinstance(value, float):
            result = Decimal(repr(value))
        else:
            return value
        if not result.is_finite():
            raise _bad(path, "a finite decimal number", value)
        exponent = result.as_tuple().exponent
        if isinstance(exponent, int) and -exponent > scale:
            raise _bad(path, f"at most {scale} decimal place(s) (the schema's scale)", value)
        if result.adjusted() + 1 + scale > precision:
            raise _bad(path, f"at most {precision - scale} digit(s) before the point "
                             f"(precision {precision}, scale {scale})", value)
        return result
    return conv


def _convert_iso(path: str, parse: Callable[[str], Any], expected: str) -> Convert:
    def conv(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse(value)
            except ValueError:
                raise _bad(path, expected, value) from None
        return value
    return conv


_LOGICAL_STRINGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "timestamp-millis": (datetime.fromisoformat, "an RFC 3339 timestamp or epoch milliseconds"),
    "timestamp-micros": (datetime.fromisoformat, "an RFC 3339 timestamp or epoch microseconds"),
    "local-timestamp-millis": (datetime.fromisoformat, "an ISO 8601 local date-time or "
                                                       "milliseconds"),
    "local-timestamp-micros": (datetime.fromisoformat, "an ISO 8601 local date-time or "
                                                       "microseconds"),
    "date": (date.fromisoformat, "an ISO 8601 date (YYYY-MM-DD) or days since the epoch"),
    "time-millis": (time.fromisoformat, "an ISO 8601 time or milliseconds since midnight"),
    "time-micros": (time.fromisoformat, "an ISO 8601 time or microseconds since midnight"),
}


def avro_converter(schema: Any, named: dict[str, Any]) -> Convert | None:
    """A function that turns parsed JSON into what fastavro writes for ``schema``,
    in place where it can (records, arrays, maps), or ``None`` when the JSON
    value can go to fastavro as it is (no bytes, fixed or logical types)."""
    return _Converters(named).build(schema, avro_name(schema) or "value")


class _Converters:
    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.memo: dict[str, Convert | None] = {}

    def build(self, schema: Any, path: str) -> Convert | None:
        if isinstance(schema, str):
            if schema == "bytes":
                return _convert_bytes(path)
            if schema in self.named:
                return self.named_type(schema, path)
            return None
        if isinstance(schema, list):
            return self.union(schema, path)
        if not isinstance(schema, dict):
            return None
        kind = schema.get("type")
        logical = schema.get("logicalType")
        if logical == "decimal" and kind in ("bytes", "fixed"):
            return _convert_decimal(path, int(schema.get("precision", 0)),
                                    int(schema.get("scale", 0)))
        if logical in _LOGICAL_STRINGS and kind in ("int", "long"):
            parse, expected = _LOGICAL_STRINGS[logical]
            return _convert_iso(path, parse, expected)
        if kind in ("bytes", "fixed"):
            return _convert_bytes(path)
        if kind == "record" or kind == "error":
            name = str(schema.get("name"))
            if name in self.memo:
                return self.memo[name]
            ref = _Ref()
            self.memo[name] = ref
            built = self.record(schema, path)
            ref.fn = built
            self.memo[name] = built
            return built
        if kind == "array":
            item = self.build(schema.get("items"), f"{path}[]")
            if item is None:
                return None

            def conv_array(value: Any) -> Any:
                if type(value) is list:
                    value[:] = [v if v is None else item(v) for v in value]
                return value
            return conv_array
        if kind == "map":
            val = self.build(schema.get("values"), f"{path}{{}}")
            if val is None:
                return None

            def conv_map(value: Any) -> Any:
                if type(value) is dict:
                    for k, v in value.items():
                        if v is not None:
                            value[k] = val(v)
                return value
            return conv_map
        if isinstance(kind, str | list | dict) and kind not in (
                "null", "boolean", "int", "long", "float", "double", "string", "enum"):
            return self.build(kind, path)
        return None

    def named_type(self, name: str, path: str) -> Convert | None:
        if name in self.memo:
            return self.memo[name]
        return self.build(self.named[name], path)

    def record(self, schema: dict[str, Any], path: str) -> Convert | None:
        fields = []
        for f in schema.get("fields", ()):
            conv = self.build(f["type"], f"{path}.{f['name']}")
            if conv is not None:
                fields.append((f["name"], conv))
        if not fields:
            return None

        def conv_record(value: Any) -> Any:
            if type(value) is dict:
                for name, conv in fields:
                    v = value.get(name)
                    if v is not None:
                        value[name] = conv(v)
            return value
        return conv_record

    def union(self, branches: list[Any], path: str) -> Convert | None:
        plain_string = any(
            b == "string" or (isinstance(b, dict) and b.get("type") == "string")
            for b in branches)
        by_type: list[tuple[type | tuple[type, ...], Convert, set[str] | None]] = []
        for b in branches:
            resolved = self.named.get(b, b) if isinstance(b, str) else b
            conv = self.build(b, path)
            if conv is None:
                continue
            kind = resolved.get("type") if isinstance(resolved, dict) else resolved
            if kind == "record" or kind == "error":
                names = {f["name"] for f in resolved.get("fields", ())}
                by_type.append((dict, conv, names))
            elif kind == "map":
                by_type.append((dict, conv, None))
            elif kind == "array":
                by_type.append((list, conv, None))
            elif not plain_string:  # a string goes to the string branch untouched
                logical = resolved.get("logicalType") if isinstance(resolved, dict) else None
                numbers = (int, float) if logical == "decimal" else ()
                by_type.append(((str, *numbers), conv, None))
        if not by_type:
            return None

        def conv_union(value: Any) -> Any:
            for kinds, conv, names in by_type:
                if isinstance(value, kinds) and not isinstance(value, bool) and (
                        names is None or names.issuperset(value)):  # type: ignore[arg-type]
                    return conv(value)
            return value
        return conv_union


_MISSING = object()
_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)
Check = Callable[[Any], None]


def avro_checker(schema: Any, named: dict[str, Any]) -> Check | None:
    """A function that raises :class:`_Bad` for values fastavro's writer would
    coerce instead of refusing: it writes any object as a boolean (``"yes"``,
    ``null``), truncates floats into ints and longs and turns strings into
    doubles. Everything else fastavro checks itself; unions it resolves by
    validating the value against each branch, so the check stops there."""
    return _Checkers(named).build(schema, avro_name(schema) or "value")


def _check_bool(path: str) -> Check:
    def check(value: Any) -> None:
        if value.__class__ is not bool:
            raise _bad(path, "boolean", value)
    return check


def _check_int(path: str, kind: str, low: int, high: int) -> Check:
    def check(value: Any) -> None:
        if value.__class__ is not int or not low <= value <= high:
            raise _bad(path, kind, value)
    return check


def _check_number(path: str, kind: str) -> Check:
    def check(value: Any) -> None:
        cls = value.__class__
        if cls is not float and cls is not int:
            raise _bad(path, kind, value)
    return check


class _Checkers:
    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.memo: dict[str, Check | None] = {}

    def build(self, schema: Any, path: str) -> Check | None:
        if isinstance(schema, dict):
            if schema.get("logicalType") is not None:
                return None  # converted before (decimal, timestamps), or fastavro's own
            kind = schema.get("type")
            if kind in ("record", "error"):
                return self.record(schema, path)
            if kind == "array":
                item = self.build(schema.get("items"), f"{path}[]")
                if item is None:
                    return None

                def check_array(value: Any) -> None:
                    if value.__class__ is list:
                        for v in value:
                            item(v)
                return check_array
            if kind == "map":
                val = self.build(schema.get("values"), f"{path}{{}}")
                if val is None:
                    return None

                def check_map(value: Any) -> None:
                    if value.__class__ is dict:
                        for v in value.values():
                            val(v)
                return check_map
            schema = kind
        if not isinstance(schema, str):
            return None  # a union: fastavro validates each branch
        if schema == "boolean":
            return _check_bool(path)
        if schema == "int":
            return _check_int(path, "int", *_INT32)
        if schema == "long":
            return _check_int(path, "long", *_INT64)
        if schema in ("float", "double"):
            return _check_number(path, schema)
        if schema in self.named:
            return self.build(self.named[schema], path)
        return None

    def record(self, schema: dict[str, Any], path: str) -> Check | None:
        name = str(schema.get("name"))
        if name in self.memo:
            return self.memo[name]
        holder: list[Check | None] = [None]

        def recursive(value: Any) -> None:
            fn = holder[0]
            if fn is not None:
                fn(value)
        self.memo[name] = recursive
        fields = []
        for f in schema.get("fields", ()):
            check = self.build(f["type"], f"{path}.{f['name']}")
            if check is not None:
                fields.append((f["name"], check))
        if not fields:
            self.memo[name] = None
            return None
        missing = _MISSING

        def check_record(value: Any) -> None:
            if value.__class__ is dict:
                get = value.get
                for field_name, check in fields:
                    v = get(field_name, missing)
                    if v is not missing:  # absent: fastavro takes the default or refuses
                        check(v)
        holder[0] = check_record
        self.memo[name] = check_record
        return check_record


class AvroCodec:
    """One Avro schema (a writer schema, and for decode an optional reader schema)."""

    name = "avro"

    def __init__(self, schema: Any, *, reader: Any = None, reject_extra: bool = False,
                 label: str | None = None) -> None:
        self.schema = schema
        self.reader = reader
        self.full_name = avro_name(schema)
        self.label = label or (f"Avro schema {self.full_name}" if self.full_name
                               else "the Avro schema")
        named = schema.get("__named_schemas", {}) if isinstance(schema, dict) else {}
        self._convert = avro_converter(schema, named)
        self._check = avro_checker(schema, named)
        self._strict = reject_extra
        self._write: Write | None = None
        if not reject_extra:
            try:
                self._write = compile_writer(schema, named, self.full_name or "value")
            except Unsupported:
                self._write = None  # fastavro writes this schema

    def to_json(self, data: bytes, offset: int = 0) -> bytes:
        stream = io.BytesIO(data)
        if offset:
            stream.seek(offset)
        try:
            record = fastavro.schemaless_reader(stream, self.schema, self.reader)
        except Exception as exc:  # EOFError, IndexError, UnicodeDecodeError, ValueError ...
            raise RejectedError(f"payload does not fit {self.label}: {_avro_read_error(exc)}") \
                from None
        left = len(data) - stream.tell()
        if left:
            raise RejectedError(f"payload does not fit {self.label}: {left} byte(s) left after "
                                "the record (written with another schema?)")
        return _dumps(record)

    def from_json(self, data: bytes, prefix: bytes = b"") -> bytes:
        value = _loads(data)
        write = self._write
        if write is not None:
            buffer = bytearray(prefix)
            try:
                if self._convert is not None:
                    value = self._convert(value)
                write(value, buffer)
            except (_Bad, Misfit) as exc:
                raise RejectedError(f"JSON does not fit {self.label}: {exc}") from None
            except (OverflowError, ValueError) as exc:  # defensive: a number out of range
                raise RejectedError(f"JSON does not fit {self.label}: "
                                    f"{type(exc).__name__}: {exc}") from None
            return bytes(buffer)
        try:
            if self._convert is not None:
                value = self._convert(value)
            if self._check is not None:
                self._check(value)
        except _Bad as exc:
            raise RejectedError(f"JSON does not fit {self.label}: {exc}") from None
        out = io.BytesIO()
        if prefix:
            out.write(prefix)
        try:
            fastavro.schemaless_writer(out, self.schema, value,
                                       strict_allow_default=self._strict)
        except Exception as exc:
            raise RejectedError(f"JSON does not fit {self.label}: "
                                f"{self._explain(value, exc)}") from None
        return out.getvalue()

    def _explain(self, value: Any, exc: Exception) -> str:
        """fastavro's writer names only the field; its validator names the path."""
        if self._strict and "more fields than the schema" in str(exc):
            return str(exc)
        try:
            avro_validate(value, self.schema, raise_errors=True)
        except AvroValidationError as verr:
            errors = [str(e) for e in verr.errors] or [str(verr)]
            return "; ".join(errors[:3])
        except Exception:
            pass
        return f"{type(exc).__name__}: {exc}"


def _avro_read_error(exc: Exception) -> str:
    if isinstance(exc, EOFError | StopIteration):
        return "the payload ends inside the record (truncated, or another schema)"
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------- Protobuf

_WELL_KNOWN_MODULES = (
    "any_pb2", "api_pb2", "duration_pb2", "empty_pb2", "field_mask_pb2", "source_context_pb2",
    "struct_pb2", "timestamp_pb2", "type_pb2", "wrappers_pb2", "descriptor_pb2",
)


@functools.lru_cache(maxsize=1)
def _well_known() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    import importlib

    out = {}
    for name in _WELL_KNOWN_MODULES:
        module = importlib.import_module(f"google.protobuf.{name}")
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        out[proto.name] = proto
    return out


class Descriptors:
    """A FileDescriptorSet loaded into its own pool."""

    def __init__(self, path: str, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
        self.path = path
        self.files = {f.name: f for f in files}
        self.pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()

        def add(name: str, needed_by: str | None) -> None:
            if name in added:
                return
            proto = self.files.get(name) or _well_known().get(name)
            if proto is None:
                raise ValueError(
                    f"expected {path!r} to hold {name!r}, which {needed_by!r} imports; found no "
                    "such file in the set (build it with protoc --include_imports)")
            for dep in proto.dependency:
                add(dep, name)
            try:
                self.pool.Add(proto)
            except Exception as exc:
                raise ValueError(f"expected a consistent descriptor set in {path!r}, found "
                                 f"{name!r} refused: {exc}") from None
            added.add(name)

        for name in self.files:
            add(name, None)

    def message_names(self) -> list[str]:
        names: list[str] = []

        def walk(prefix: str, messages: Any) -> None:
            for m in messages:
                full = f"{prefix}{m.name}"
                if not m.options.map_entry:
                    names.append(full)
                walk(full + ".", m.nested_type)

        for f in self.files.values():
            if not f.name.startswith("google/protobuf/"):
                walk(f"{f.package}." if f.package else "", f.message_type)
        return names

    def find(self, full_name: str) -> Descriptor:
        try:
            return self.pool.FindMessageTypeByName(full_name)
        except KeyError:
            known = self.message_names()
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise ValueError(f"expected a message that {self.path!r} defines, found "
                             f"{full_name!r}, which it does not (it has: {shown or 'none'}; "
                             "give the full name, package included)") from None


def load_descriptors(path: str) -> Descriptors:
    if not Path(path).is_file():
        raise _missing_file(path, "a Protobuf descriptor set (protoc --descriptor_set_out)")
    return _load_descriptors_cached(*_file_key(path))


@functools.lru_cache(maxsize=64)
def _load_descriptors_cached(path: str, _mtime: int, _size: int) -> Descriptors:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"expected a readable descriptor set at {path!r}, found: {exc}") \
            from None
    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(raw)
    except DecodeError as exc:
        raise ValueError(f"expected a binary FileDescriptorSet in {path!r} (protoc "
                         f"--descriptor_set_out=FILE --include_imports), found bytes that do not "
                         f"parse as one: {exc}") from None
    if not fds.file:
        raise ValueError(f"expected a FileDescriptorSet with at least one file in {path!r}, "
                         "found none (a .proto source file is not a descriptor set: compile "
                         "it with protoc --descriptor_set_out=FILE --include_imports)")
    return Descriptors(path, list(fds.file))


def _index_path(file: descriptor_pb2.FileDescriptorProto, full_name: str) -> list[int] | None:
    prefix = f"{file.package}." if file.package else ""

    def walk(messages: Any, base: str, path: list[int]) -> list[int] | None:
        for i, m in enumerate(messages):
            name = f"{base}{m.name}"
            if name == full_name:
                return [*path, i]
            found = walk(m.nested_type, name + ".", [*path, i])
            if found is not None:
                return found
        return None

    return walk(file.message_type, prefix, [])


def _name_at(file: descriptor_pb2.FileDescriptorProto, indexes: list[int]) -> str | None:
    name = file.package
    messages: Any = file.message_type
    for i in indexes:
        if i >= len(messages):
            return None
        m = messages[i]
        name = f"{name}.{m.name}" if name else str(m.name)
        messages = m.nested_type
    return str(name)


# Fast paths for the proto3 JSON mapping. json_format walks every message in
# generic Python (~50 µs decode, ~100 µs encode for a 12-field message here);
# these walk converters compiled once per message type and build messages with
# the C constructor. Anything they do not handle exactly as json_format would
# (well-known types aside, which go to json_format itself) raises _Slow, and the
# message goes through json_format, which also words the errors.

_FD = FieldDescriptor
_PB_INT64 = frozenset((_FD.TYPE_INT64, _FD.TYPE_UINT64, _FD.TYPE_SINT64, _FD.TYPE_FIXED64,
                    _FD.TYPE_SFIXED64))
_PB_INT32 = frozenset((_FD.TYPE_INT32, _FD.TYPE_UINT32, _FD.TYPE_SINT32, _FD.TYPE_FIXED32,
                    _FD.TYPE_SFIXED32))
_WELL_KNOWN_JSON = frozenset(
    f"google.protobuf.{n}" for n in (
        "Any", "Duration", "FieldMask", "ListValue", "Struct", "Timestamp", "Value",
        "DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value",
        "UInt32Value", "BoolValue", "StringValue", "BytesValue"))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MORE_THAN_MICROS = re.compile(r"\.\d{7}")


class _Slow(Exception):
    """This value needs json_format."""


def _float_out(value: float) -> Any:
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _float32_out(value: float) -> Any:
    out = _float_out(value)
    return ToShortestFloat(out) if isinstance(out, float) else out


class _ProtoToDict:
    """message -> the dict MessageToDict(always_print_fields_with_no_presence=True) gives."""

    def __init__(self, pool: descriptor_pool.DescriptorPool, proto_names: bool) -> None:
        self.pool = pool
        self.proto_names = proto_names
        self.memo: dict[str, Callable[[Any], Any]] = {}

    def message(self, desc: Descriptor) -> Callable[[Any], Any]:
        hit = self.memo.get(desc.full_name)
        if hit is not None:
            return hit
        if desc.full_name in _WELL_KNOWN_JSON:
            pool = self.pool

            def wkt(msg: Any) -> Any:
                return json_format.MessageToDict(msg, descriptor_pool=pool)
            self.memo[desc.full_name] = wkt
            return wkt
        fields: list[tuple[str, str, Callable[[Any], Any] | None, int]] = []
        # mode 0: always printed; 1: printed when set (presence); 2: repeated; 3: map

        def convert_message(msg: Any) -> Any:
            out: dict[str, Any] = {}
            for key, attr, conv, mode in fields:
                if mode == 1:
                    if not msg.HasField(attr):
                        continue
                    value = getattr(msg, attr)
                    out[key] = value if conv is None else conv(value)
                elif mode == 0:
                    value = getattr(msg, attr)
                    out[key] = value if conv is None else conv(value)
                elif mode == 2:
                    values = getattr(msg, attr)
                    out[key] = list(values) if conv is None else [conv(v) for v in values]
                else:
                    assert conv is not None
                    out[key] = conv(getattr(msg, attr))
            return out

        self.memo[desc.full_name] = convert_message
        for f in desc.fields:
            key = f.name if self.proto_names else f.json_name
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                fields.append((key, f.name, self.map(f.message_type), 3))
                continue
            conv = self.value(f)
            mode = 2 if f.is_repeated else 1 if f.has_presence else 0
            fields.append((key, f.name, conv, mode))
        return convert_message

    def value(self, f: FieldDescriptor) -> Callable[[Any], Any] | None:
        kind = f.type
        if kind in _PB_INT64:
            return str
        if kind == _FD.TYPE_DOUBLE:
            return _float_out
        if kind == _FD.TYPE_FLOAT:
            return _float32_out
        if kind == _FD.TYPE_BYTES:
            return lambda v: base64.b64encode(v).decode("ascii")
        if kind == _FD.TYPE_ENUM:
            names = {v.number: v.name for v in f.enum_type.values}
            if f.enum_type.full_name == "google.protobuf.NullValue":
                return lambda _v: None
            return lambda v: names.get(v, v)
        if kind in (_FD.TYPE_MESSAGE, _FD.TYPE_GROUP):
            return self.message(f.message_type)
        return None  # int32 kinds, bool, string: as they are

    def map(self, entry: Descriptor) -> Callable[[Any], Any]:
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        conv = self.value(value_field)
        if key_field.type == _FD.TYPE_BOOL:
            def key(k: Any) -> str:
                return "true" if k else "false"
        else:
            def key(k: Any) -> str:
                return str(k)
        if conv is None:
            return lambda m: {key(k): v for k, v in m.items()}
        return lambda m: {key(k): conv(v) for k, v in m.items()}


class _DictToProto:
    """parsed JSON -> constructor arguments; raises _Slow for what it does not do."""

    def __init__(self, pool: descriptor_pool.DescriptorPool, ignore_unknown: bool) -> None:
        self.pool = pool
        self.ignore_unknown = ignore_unknown
        self.memo: dict[str, Callable[[Any], Any]] = {}

    def message(self, desc: Descriptor) -> Callable[[Any], Any]:
        hit = self.memo.get(desc.full_name)
        if hit is not None:
            return hit
        if desc.full_name in _WELL_KNOWN_JSON:
            cls = message_factory.GetMessageClass(desc)
            pool = self.pool

            def wkt(value: Any) -> Any:
                try:
                    return json_format.ParseDict(value, cls(), descriptor_pool=pool)
                except Exception:
                    raise _Slow from None
            if desc.full_name == "google.protobuf.Timestamp":
                def timestamp(value: Any) -> Any:
                    # json_format's own parser takes ~9 µs; fromisoformat a tenth of it
                    if value.__class__ is not str:
                        raise _Slow
                    if len(value) < 20 or value[10] != "T" or _MORE_THAN_MICROS.search(value):
                        return wkt(value)  # fromisoformat would drop the nanoseconds
                    try:
                        moment = datetime.fromisoformat(value)
                    except ValueError:
                        return wkt(value)  # nanoseconds, or not RFC 3339: json_format says
                    if moment.tzinfo is None:
                        raise _Slow
                    delta = moment - _EPOCH
                    return cls(seconds=delta.days * 86400 + delta.seconds,
                               nanos=delta.microseconds * 1000)
                self.memo[desc.full_name] = timestamp
                return timestamp
            self.memo[desc.full_name] = wkt
            return wkt
        by_key: dict[str, tuple[str, Callable[[Any], Any] | None]] = {}
        ignore = self.ignore_unknown

        def convert_message(value: Any) -> Any:
            if value.__class__ is not dict:
                raise _Slow
            out = {}
            for key, v in value.items():
                hit = by_key.get(key)
                if hit is None:
                    if ignore:
                        continue
                    raise _Slow
                if v is None:
                    continue
                attr, conv = hit
                out[attr] = v if conv is None else conv(v)
            return out

        self.memo[desc.full_name] = convert_message
        for f in desc.fields:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                conv: Callable[[Any], Any] | None = self.map(f.message_type)
            elif f.is_repeated:
                conv = self.repeated(self.value(f))
            else:
                conv = self.value(f)
            by_key[f.name] = by_key[f.json_name] = (f.name, conv)
        return convert_message

    def value(self, f: FieldDescriptor) -> Callable[[Any], Any]:
        kind = f.type
        if kind in _PB_INT64:
            def int64(v: Any) -> Any:
                cls = v.__class__
                if cls is int:
                    return v
                if cls is str:
                    try:
                        return int(v)
                    except ValueError:
                        raise _Slow from None
                raise _Slow
            return int64
        if kind in _PB_INT32:
            def int32(v: Any) -> Any:
                if v.__class__ is not int:
                    raise _Slow
                return v
            return int32
        if kind in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
            def number(v: Any) -> Any:
                cls = v.__class__
                if cls is not float and cls is not int:
                    raise _Slow
                return v
            return number
        if kind == _FD.TYPE_BOOL:
            def boolean(v: Any) -> Any:
                if v.__class__ is not bool:
                    raise _Slow
                return v
            return boolean
        if kind == _FD.TYPE_STRING:
            def string(v: Any) -> Any:
                if v.__class__ is not str:
                    raise _Slow
                return v
            return string
        if kind == _FD.TYPE_BYTES:
            def data(v: Any) -> Any:
                if v.__class__ is not str:
                    raise _Slow
                try:
                    return base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError):
                    raise _Slow from None
            return data
        if kind == _FD.TYPE_ENUM:
            names = frozenset(f.enum_type.values_by_name)
            numbers = frozenset(f.enum_type.values_by_number)

            def enum(v: Any) -> Any:
                if (v.__class__ is str and v in names) or (v.__class__ is int and v in numbers):
                    return v
                raise _Slow
            return enum
        if kind == _FD.TYPE_MESSAGE:
            return self.message(f.message_type)
        def slow(_v: Any) -> Any:
            raise _Slow
        return slow

    @staticmethod
    def repeated(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def convert(v: Any) -> Any:
            if v.__class__ is not list:
                raise _Slow
            return [item(x) for x in v]
        return convert

    def map(self, entry: Descriptor) -> Callable[[Any], Any]:
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        conv = self.value(value_field)
        if key_field.type == _FD.TYPE_STRING:
            def key(k: str) -> Any:
                return k
        elif key_field.type == _FD.TYPE_BOOL:
            def key(k: str) -> Any:
                if k not in ("true", "false"):
                    raise _Slow
                return k == "true"
        else:
            def key(k: str) -> Any:
                try:
                    return int(k)
                except ValueError:
                    raise _Slow from None

        def convert(v: Any) -> Any:
            if v.__class__ is not dict:
                raise _Slow
            return {key(k): conv(x) for k, x in v.items()}
        return convert


class ProtobufCodec:
    """Messages of one .proto file of a descriptor set; ``message`` is the one
    encode writes (and decode reads when the payload does not say otherwise)."""

    name = "protobuf"

    def __init__(self, descriptors: Descriptors, message: str, *, proto_names: bool = True,
                 reject_extra: bool = False) -> None:
        self.descriptors = descriptors
        desc = descriptors.find(message)
        self.full_name = desc.full_name
        self.file = descriptors.files.get(desc.file.name) or _well_known()[desc.file.name]
        self.indexes = _index_path(self.file, desc.full_name) or [0]
        self.cls: type[ProtoMessage] = message_factory.GetMessageClass(desc)
        self._by_indexes: dict[tuple[int, ...], type[ProtoMessage]] = {
            tuple(self.indexes): self.cls}
        self._proto_names = proto_names
        self._ignore_unknown = not reject_extra
        self.label = f"Protobuf message {self.full_name}"
        self._to_dict = _ProtoToDict(descriptors.pool, proto_names)
        self._from_dict = _DictToProto(descriptors.pool, not reject_extra).message(desc)
        self._to_dicts: dict[type[ProtoMessage], Callable[[Any], Any]] = {
            self.cls: self._to_dict.message(desc)}

    def schema_text(self) -> str:
        """The .proto file as a registry takes it from a serializer: the base64 of
        its serialized FileDescriptorProto (as Confluent's clients send it)."""
        return base64.b64encode(self.file.SerializeToString(deterministic=True)).decode()

    def imports_beyond_well_known(self) -> list[str]:
        return [d for d in self.file.dependency if d not in _well_known()]

    def message_at(self, indexes: list[int]) -> type[ProtoMessage]:
        key = tuple(indexes)
        cls = self._by_indexes.get(key)
        if cls is None:
            name = _name_at(self.file, indexes)
            if name is None:
                raise RejectedError(
                    f"message index path {indexes} names no message of {self.file.name!r}")
            cls = message_factory.GetMessageClass(self.descriptors.pool.FindMessageTypeByName(
                name))
            self._by_indexes[key] = cls
        return cls

    def to_json(self, data: bytes, offset: int = 0,
                cls: type[ProtoMessage] | None = None) -> bytes:
        cls = cls or self.cls
        try:
            message = cls.FromString(memoryview(data)[offset:] if offset else data)
        except DecodeError as exc:
            raise RejectedError(f"payload is not a valid {cls.DESCRIPTOR.full_name}: {exc}") \
                from None
        to_dict = self._to_dicts.get(cls)
        if to_dict is None:
            to_dict = self._to_dicts[cls] = self._to_dict.message(cls.DESCRIPTOR)
        return _dumps(to_dict(message))

    def to_json_slow(self, data: bytes) -> bytes:
        """What json_format itself gives (the fast path is tested against it)."""
        value = json_format.MessageToDict(
            self.cls.FromString(data), always_print_fields_with_no_presence=True,
            preserving_proto_field_name=self._proto_names,
            descriptor_pool=self.descriptors.pool)
        return _dumps(value)

    def from_json(self, data: bytes, prefix: bytes = b"") -> bytes:
        value = _loads(data)
        try:
            message = self.cls(**self._from_dict(value))
        except (_Slow, ValueError, TypeError, KeyError):
            message = self._parse_slow(value)
        body: bytes = message.SerializeToString()
        return prefix + body

    def _parse_slow(self, value: Any) -> ProtoMessage:
        message = self.cls()
        try:
            json_format.ParseDict(value, message, ignore_unknown_fields=self._ignore_unknown,
                                  descriptor_pool=self.descriptors.pool)
        except json_format.ParseError as exc:
            raise RejectedError(f"JSON does not fit {self.label}: {exc}") from None
        return message
