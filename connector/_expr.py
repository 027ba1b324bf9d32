"""CEL expressions over messages: compiled and type-checked once, evaluated per message.

One evaluator serves every plugin and the engine (``filter``, ``mapping``, a
sink's ``when:``). An expression sees the message as these variables:

============  ===================  ==============================================
name          CEL type             value
============  ===================  ==============================================
``data``      dyn                  the payload parsed as JSON when it is JSON,
                                   else the raw bytes
``subject``   string               the subject (``""`` when the message has none)
``tokens``    list(string)         the subject split at ``.``
``headers``   map(string, string)  the headers
``key``       bytes                the key (``b""`` when none)
``id``        string               the source's id (``""`` when none)
``timestamp`` timestamp            when the source saw it (the epoch when unknown)
============  ===================  ==============================================

Compilation runs Google's CEL checker (``cel-expr-python``), so a syntax
error, an unknown variable or a type mismatch (``subject + 1``) fails at
config load with the line and column inside the expression; only what
depends on ``data`` (dynamic JSON) is typed at run time. docs/processing.md
says why this library rather than ``common-expression-language``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Final

import orjson
from cel_expr_python import cel
from cel_expr_python.ext import ext_encoders, ext_math, ext_strings
from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from ._errors import RejectedError
from ._message import Message

_T = cel.Type
_TYPES: Final[dict[str, Any]] = {
    "data": _T.DYN,
    "subject": _T.STRING,
    "tokens": _T.List(_T.STRING),
    "headers": _T.Map(_T.STRING, _T.STRING),
    "key": _T.BYTES,
    "id": _T.STRING,
    "timestamp": _T.TIMESTAMP,
}
VARIABLES: Final[tuple[str, ...]] = tuple(_TYPES)


def _extensions() -> list[Any]:
    return [ext_strings.ExtStrings(), ext_encoders.ExtEncoders(), ext_math.ExtMath()]


def _env(names: Iterable[str]) -> Any:
    return cel.NewEnv(variables={n: _TYPES[n] for n in names}, extensions=_extensions())


_ENV: Final = _env(VARIABLES)
_EPOCH: Final = datetime.datetime.fromtimestamp(0, datetime.UTC)
_ERROR_AT = re.compile(r"ERROR: <input>:(\d+):(\d+): ([^\n]*)")
_MEMO_LIMIT = 4096  # distinct subjects remembered per subject-only expression


class ExpressionError(ValueError):
    """An expression that does not compile or type-check.

    ``line`` and ``column`` (1-based) point into the expression's own text.
    """

    def __init__(self, message: str, *, source: str, line: int = 1, column: int = 1) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        super().__init__(f"{message} (at column {column} of the expression {source!r})"
                         if "\n" not in source else
                         f"{message} (at line {line}, column {column} of the expression)")


class ExpressionFailed(RejectedError):
    """An expression failed on one message at run time (a missing JSON field,
    a division by zero, a value of the wrong type): that message is poison."""


class Bindings:
    """The variables of one message, each computed once when first needed, so
    that several expressions over one message parse its JSON once."""

    __slots__ = ("_data", "message")

    _UNSET: Final = object()

    def __init__(self, message: Message) -> None:
        self.message = message
        self._data: Any = Bindings._UNSET

    @property
    def data(self) -> Any:
        if self._data is Bindings._UNSET:
            self._data = parse_data(self.message.data)
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        self._data = value

    def value(self, name: str) -> Any:
        """The variable as the CEL runtime takes it. Bytes go in as a bytearray:
        cel-expr-python reads a ``bytes`` value only up to its first NUL."""
        m = self.message
        if name == "data":
            data = self.data
            return bytearray(data) if isinstance(data, bytes) else data
        if name == "subject":
            return m.subject or ""
        if name == "tokens":
            return m.subject.split(".") if m.subject else []
        if name == "headers":
            return dict(m.headers)
        if name == "key":
            return bytearray(m.key) if m.key else bytearray()
        if name == "id":
            return m.id or ""
        if name == "timestamp":
            if m.timestamp is None:
                return _EPOCH
            return datetime.datetime.fromtimestamp(m.timestamp, datetime.UTC)
        raise KeyError(name)


def parse_data(data: bytes) -> Any:
    """The payload as expressions see it: parsed JSON, or the bytes themselves."""
    if not data:
        return b""
    first = data[:1]
    # Only what can start a JSON document is parsed; binary payloads skip the attempt.
    if first not in b'{["-0123456789tfn \t\r\n':
        return data
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data


class Expression:
    """A compiled, type-checked CEL expression over a message.

    ``result`` narrows what it must give: ``"bool"`` for conditions (``when:``,
    ``filter``), ``"string"``, ``"bytes"``, or ``None`` for anything.
    """

    __slots__ = ("_memo", "_needs", "_program", "_subject_only", "result", "source")

    def __init__(self, source: str, *, result: str | None = None) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ExpressionError("expected a CEL expression, found an empty string",
                                  source=str(source))
        self.source = source
        self.result = result
        self._program = _compile(_ENV, source)
        given = self._program.return_type()
        if result is not None and given != _T.DYN:
            wanted = {"bool": _T.BOOL, "string": _T.STRING, "bytes": _T.BYTES}[result]
            if given != wanted:
                raise ExpressionError(
                    f"expected an expression giving a {result}, found one giving "
                    f"{given.name().lower()}", source=source)
        self._needs = tuple(n for n in VARIABLES if _uses(source, n))
        # A condition on the subject alone is a function of the subject: remember
        # its verdicts (subjects repeat), bounded.
        self._subject_only = bool(self._needs) and set(self._needs) <= {"subject", "tokens"}
        self._memo: dict[str | None, Any] = {}

    @property
    def variables(self) -> tuple[str, ...]:
        """The message variables this expression reads."""
        return self._needs

    def evaluate(self, message: Message | Bindings) -> Any:
        """The expression's value for ``message``, as plain Python values.

        Raises :class:`ExpressionFailed` (a :class:`RejectedError`) when CEL
        reports an error for this message.
        """
        if self._subject_only:
            subject = message.message.subject if isinstance(message, Bindings) else \
                message.subject
            memo = self._memo
            try:
                return memo[subject]
            except KeyError:
                pass
            value = self._run(message)
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[subject] = value
            return value
        return self._run(message)

    def test(self, message: Message | Bindings) -> bool:
        """Evaluate a condition; a result that is not a bool is a failure."""
        value = self.evaluate(message)
        if value is True or value is False:
            return value
        raise ExpressionFailed(
            f"expression {self.source!r} gave {_describe(value)}, expected true or false")

    def _run(self, message: Message | Bindings) -> Any:
        bindings = message if isinstance(message, Bindings) else Bindings(message)
        try:
            activation = {n: bindings.value(n) for n in self._needs}
            out = self._program.eval(data=activation)
        except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
            raise ExpressionFailed(f"expression {self.source!r} failed: {exc}") from None
        if out.type() == _T.ERROR:
            raise ExpressionFailed(f"expression {self.source!r} failed: {out.value()}")
        return _plain(out.plain_value())

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Expression) and other.source == self.source
                and other.result == self.result)

    def __hash__(self) -> int:
        return hash((self.source, self.result))


def _compile(env: Any, source: str) -> Any:
    try:
        return env.compile(source)
    except RuntimeError as exc:
        text = str(exc)
        found = _ERROR_AT.search(text)
        if found is None:
            raise ExpressionError(text.removeprefix("INVALID_ARGUMENT: "), source=source) \
                from None
        line, column, what = int(found.group(1)), int(found.group(2)), found.group(3)
        what = what.replace(" (in container '')", "")
        if what.startswith("undeclared reference to "):
            what += f"; expected one of the message variables: {', '.join(VARIABLES)}"
        raise ExpressionError(what, source=source, line=line, column=column) from None


_WITHOUT: dict[str, Any] = {}


def _uses(source: str, name: str) -> bool:
    """Does ``source`` read the variable ``name``? Compiling it where ``name`` is
    undeclared tells exactly (a comprehension's own variable is not counted)."""
    env = _WITHOUT.get(name)
    if env is None:
        env = _WITHOUT[name] = _env(n for n in VARIABLES if n != name)
    try:
        env.compile(source)
    except RuntimeError as exc:
        text = str(exc)
        return f"undeclared reference to '{name}'" in text or \
            f"undeclared reference to '{name}." in text
    return False


def _plain(value: Any) -> Any:
    """CEL's bytes come back as bytearray; the SDK speaks bytes."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _validator(result: str | None) -> Callable[[Any], Expression]:
    def to_expression(value: Any) -> Expression:
        if isinstance(value, Expression):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected a CEL expression written as a string, found "
                             f"{type(value).__name__}")
        return Expression(value, result=result)

    return to_expression


def _schema(what: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "minLength": 1,
                           "description": f"a CEL expression giving {what}"})


#: A config field holding a CEL expression of any result type.
Expr = Annotated[Expression, PlainValidator(_validator(None)),
                 PlainSerializer(lambda e: e.source, return_type=str), _schema("any value")]
#: A config field holding a CEL condition (an expression giving a bool).
Condition = Annotated[Expression, PlainValidator(_validator("bool")),
                      PlainSerializer(lambda e: e.source, return_type=str), _schema("a bool")]
