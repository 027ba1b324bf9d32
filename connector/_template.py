"""Address templates such as ``orders.{subject[1]}`` or ``{header[Tenant]}.events``.

Placeholders: ``{subject}``, ``{subject[N]}`` (a dot-separated token, negative N
from the end), ``{header[Name]}``, ``{key}``, ``{id}``. Compiled once; a
template without placeholders costs nothing per message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from pydantic import AfterValidator

from ._errors import ConfigError, RejectedError
from ._message import Message

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PART = re.compile(r"^(subject|header|key|id)(?:\[(-?\d+|[^\]]+)\])?$")

Piece = Callable[[Message], str]


def _subject_token(index: int) -> Piece:
    def piece(message: Message) -> str:
        if not message.subject:
            raise RejectedError(
                f"message has no subject to take token {index} from for the address template"
            )
        tokens = message.subject.split(".")
        try:
            return tokens[index]
        except IndexError:
            raise RejectedError(
                f"subject {message.subject!r} has no token {index} for the address template"
            ) from None

    return piece


def _header(name: str) -> Piece:
    def piece(message: Message) -> str:
        value = message.headers.get(name)
        if value is None:
            raise RejectedError(f"header {name!r} needed by the address template is missing")
        return value

    return piece


def _whole_subject(message: Message) -> str:
    if not message.subject:
        raise RejectedError("message has no subject for the address template")
    return message.subject


def _key(message: Message) -> str:
    if message.key is None:
        raise RejectedError("message has no key for the address template")
    try:
        return message.key.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Replacing the bad bytes would send keys that differ to the same address.
        raise RejectedError(
            f"key is not valid UTF-8 (byte {exc.start} of {len(message.key)}: "
            f"{message.key[:40]!r}), so it cannot be put in the address template"
        ) from None


def _id(message: Message) -> str:
    if message.id is None:
        raise RejectedError("message has no id for the address template")
    return message.id


class AddressTemplate:
    """A compiled address template; ``render(message)`` gives the address."""

    __slots__ = ("_constant", "_pieces", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        pieces: list[str | Piece] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            if m.start() > pos:
                pieces.append(text[pos : m.start()])
            pieces.append(self._compile(m.group(1)))
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        if "{" in "".join(p for p in pieces if isinstance(p, str)) or "}" in "".join(
            p for p in pieces if isinstance(p, str)
        ):
            raise ConfigError(f"unbalanced braces in address template {text!r}")
        self._pieces = pieces
        self._constant = text if all(isinstance(p, str) for p in pieces) else None

    def _compile(self, expr: str) -> Piece:
        m = _PART.match(expr.strip())
        if not m:
            raise ConfigError(
                f"unknown placeholder {{{expr}}} in address template {self.text!r}; expected "
                "{subject}, {subject[N]}, {header[Name]}, {key} or {id}"
            )
        kind, arg = m.group(1), m.group(2)
        if kind == "subject":
            if arg is None:
                return _whole_subject
            try:
                return _subject_token(int(arg))
            except ValueError:
                raise ConfigError(
                    f"{{subject[{arg}]}} in {self.text!r}: expected a token number"
                ) from None
        if kind == "header":
            if arg is None:
                raise ConfigError(f"{{header}} in {self.text!r} needs a name: {{header[Name]}}")
            return _header(arg)
        if arg is not None:
            raise ConfigError(f"{{{kind}}} takes no index in {self.text!r}")
        return _key if kind == "key" else _id

    @classmethod
    def check(cls, text: str) -> str:
        """Validate ``text`` as a template (for config models); return it unchanged."""
        try:
            cls(text)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return text

    @property
    def is_constant(self) -> bool:
        return self._constant is not None

    def render(self, message: Message) -> str:
        """The address for ``message``; :class:`RejectedError` if it lacks a part."""
        if self._constant is not None:
            return self._constant
        return "".join(p if isinstance(p, str) else p(message) for p in self._pieces)


TemplateStr = Annotated[str, AfterValidator(AddressTemplate.check)]
"""A config field holding an address template, checked when the file is validated."""
