"""Turning pydantic's validation errors into ConfigErrors with file and line."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .._errors import ConfigError
from .._expr import ExpressionError
from .yaml_tree import Path, format_path

SECRET_WORDS = ("password", "token", "secret", "seed", "credential", "passphrase")


def _describe(value: Any) -> str:
    # Containers by shape, never by content: a mapping may hold a password.
    if isinstance(value, dict):
        keys = ", ".join(str(k) for k in list(value)[:8])
        return f"a mapping with keys {keys}" if value else "an empty mapping"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)" if value else "an empty list"
    if value is None:
        return "nothing"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the last element of ``loc``, if one can be found."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _unwrap(arg)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    return tp


def _nearest_line(lines: Mapping[Path, int], path: Path) -> int | None:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def from_validation_error(
    exc: ValidationError,
    model: type[BaseModel],
    *,
    file: str,
    lines: Mapping[Path, int],
    prefix: Path = (),
    what: str = "",
) -> ConfigError:
    """The first error of ``exc`` as a ConfigError (one clear error beats twenty)."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path: Path = (*prefix, *loc)
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ExpressionError):
        return _expression_error(cause, file, lines, path, what)
    kind = err["type"]
    found = err.get("input")
    secret = any(isinstance(p, str) and any(w in p.lower() for w in SECRET_WORDS) for p in loc)
    suffix = f" ({what})" if what else ""
    if kind == "missing":
        message = (f"required field {loc[-1]!r} is missing (expected `{loc[-1]}:` here, "
                   f"found no such key){suffix}")
    elif kind in ("too_short", "too_long") and isinstance(found, list | dict | str):
        ctx = err.get("ctx") or {}
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        least = "at least" if kind == "too_short" else "at most"
        message = f"expected {least} {bound} item(s), found {_describe(found)}{suffix}"
    elif kind == "extra_forbidden":
        holder = _model_at(model, loc[:-1])
        allowed = sorted(holder.model_fields) if holder else []
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        message = f"unknown key {loc[-1]!r}{suffix}{hint}"
    else:
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif msg.startswith("Input should be"):
            msg = "expected " + msg[len("Input should be "):]
        elif msg.startswith("String should "):
            msg = "expected a string to " + msg[len("String should "):]
        shown = "a value (hidden: the field holds a secret)" if secret else _describe(found)
        if secret and "found" in msg:
            msg = msg.split(", found")[0]
        message = f"{msg}, found {shown}{suffix}" if "found" not in msg else msg + suffix
    return ConfigError(message, file=file, line=_nearest_line(lines, path), path=format_path(path))


def _expression_error(cause: ExpressionError, file: str, lines: Mapping[Path, int], path: Path,
                      what: str) -> ConfigError:
    """An expression that does not compile: the file's line and column of the fault."""
    suffix = f" ({what})" if what else ""
    line, column = _nearest_line(lines, path), None
    scalars = getattr(lines, "scalars", {})
    if path in scalars:
        start_line, start_column, style = scalars[path]
        line = start_line + cause.line - 1
        block = style in ("|", ">")
        column = start_column + cause.column - 1 if cause.line == 1 or block else cause.column
    shown = cause.source if len(cause.source) <= 80 else cause.source[:77] + "..."
    return ConfigError(f"invalid CEL expression {shown!r}: {cause.message}{suffix}", file=file,
                       line=line, column=column, path=format_path(path))
