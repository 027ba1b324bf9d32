"""JSON documents: dotted paths into nested objects, and writing CEL's values as JSON."""

from __future__ import annotations

import base64
import datetime
from typing import Any, Final

import orjson

from connector import RejectedError

_MISSING: Final = object()
_OPTIONS: Final = orjson.OPT_UTC_Z


class PathError(RejectedError):
    """A path runs through a value that is not an object."""


def kind(value: Any) -> str:
    """A JSON value's kind as a user would name it."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, bytes):
        return "bytes (not JSON)"
    return type(value).__name__


def get(doc: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path``, or :data:`MISSING`."""
    node = doc
    for key in path:
        if not isinstance(node, dict):
            return _MISSING
        node = node.get(key, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


MISSING: Final = _MISSING


def put(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``path`` to ``value``, creating the objects on the way (a null becomes one)."""
    node = doc
    last = len(path) - 1
    for i in range(last):
        key = path[i]
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise PathError(f"cannot set {'.'.join(path)}: {'.'.join(path[:i + 1])} is "
                            f"{kind(child)}, not an object")
        node = child
    node[path[last]] = value


def pop(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    """Remove ``path`` and return its value; :data:`MISSING` if it is not there."""
    node: Any = doc
    for i in range(len(path) - 1):
        node = node.get(path[i])
        if not isinstance(node, dict):
            return _MISSING
    return node.pop(path[-1], _MISSING)


def _duration(value: datetime.timedelta) -> str:
    """CEL's (and protobuf JSON's) duration text: ``1.5s``, ``-90s``, ``3600s``."""
    if value < datetime.timedelta(0):
        return "-" + _duration(-value)
    seconds = value.days * 86400 + value.seconds
    if value.microseconds:
        return f"{seconds}.{value.microseconds:06d}".rstrip("0") + "s"
    return f"{seconds}s"


def _default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.timedelta):
        return _duration(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot be written as JSON")


def dumps(value: Any) -> bytes:
    """``value`` as JSON: bytes as base64, timestamps as RFC 3339 (UTC, ``Z``),
    durations as ``"1.5s"``, the protobuf JSON mapping that CEL follows."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        if "Dict key must be str" not in str(exc):
            raise RejectedError(f"cannot write the result as JSON: {exc}") from None
    try:  # a map CEL built with int or bool keys: JSON writes them as strings
        return orjson.dumps(value, default=_default, option=_OPTIONS | orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        raise RejectedError(f"cannot write the result as JSON: {exc}") from None
