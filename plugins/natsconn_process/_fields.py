"""Config field types shared by the transforms: typed expressions and JSON paths."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, PlainSerializer, PlainValidator, WithJsonSchema

from connector import Expression, ExpressionError

_GIVING = re.compile(r"^expected an expression giving an? \w+, found one giving (\w+)$")


def _source(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a CEL expression written as a string, found "
                         f"{type(value).__name__}")
    return value


def _typed(result: str) -> Callable[[Any], Expression]:
    def validate(value: Any) -> Expression:
        if isinstance(value, Expression):
            return value
        return Expression(_source(value), result=result)

    return validate


def _bytes_or_string(value: Any) -> Expression:
    """An expression giving bytes or a string (a key): checked as both."""
    if isinstance(value, Expression):
        return value
    source = _source(value)
    try:
        return Expression(source, result="bytes")
    except ExpressionError as exc:
        if not _GIVING.match(exc.message):
            raise  # a syntax error or unknown variable: the first report says it all
    try:
        return Expression(source, result="string")
    except ExpressionError as exc:
        found = _GIVING.match(exc.message)
        if found is None:
            raise
        raise ExpressionError(f"expected an expression giving bytes or a string, found one "
                              f"giving {found.group(1)}", source=source) from None


def _schema(what: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "minLength": 1,
                           "description": f"a CEL expression giving {what}"})


_AS_TEXT = PlainSerializer(lambda e: e.source, return_type=str)

#: A CEL expression that must give a string (checked at load where the type is known).
StringExpr = Annotated[Expression, PlainValidator(_typed("string")), _AS_TEXT,
                       _schema("a string")]
#: A CEL expression that must give bytes or a string (a message key).
KeyExpr = Annotated[Expression, PlainValidator(_bytes_or_string), _AS_TEXT,
                    _schema("bytes or a string")]


def split_path(text: str) -> tuple[str, ...]:
    """``"customer.id"`` → ``("customer", "id")``: a path of object keys."""
    parts = tuple(text.split("."))
    if not text or any(not p for p in parts):
        raise ValueError(f"expected a field path such as 'customer.id' (object keys joined "
                         f"by dots), found {text!r}")
    return parts


def _check_path(text: str) -> str:
    split_path(text)
    return text


#: A dotted path of JSON object keys, e.g. ``customer.id``.
FieldPath = Annotated[str, AfterValidator(_check_path)]
