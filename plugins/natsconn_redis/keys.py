"""Key templates of the Redis sinks: the engine's address templates, plus literal
braces for Redis Cluster hash tags.

In an address template ``{...}`` is a placeholder, so a hash tag is written with
doubled braces, as in Python's ``str.format``: ``{{orders}}:{subject[1]}`` gives
the key ``{orders}:eu`` for subject ``orders.eu``, and ``{{{subject[1]}}}`` the key
``{eu}``. Everything else is :class:`connector.AddressTemplate`'s.
"""

from __future__ import annotations

from connector import AddressTemplate, ConfigError, Message


class KeyTemplate:
    """``render(message)`` gives the key; ``{{`` and ``}}`` are literal braces."""

    __slots__ = ("_constant", "_parts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[str | AddressTemplate] = []
        literal: list[str] = []
        i, n = 0, len(text)
        while i < n:
            pair = text[i:i + 2]
            if pair in ("{{", "}}"):
                literal.append(pair[0])
                i += 2
            elif text[i] == "{":
                end = text.find("}", i)
                if end < 0:
                    raise ConfigError(f"unbalanced braces in key template {text!r} "
                                      "(a literal brace, for a hash tag, is doubled: {{tag}})")
                if literal:
                    parts.append("".join(literal))
                    literal = []
                parts.append(AddressTemplate(text[i:end + 1]))
                i = end + 1
            elif text[i] == "}":
                raise ConfigError(f"unbalanced braces in key template {text!r} "
                                  "(a literal brace, for a hash tag, is doubled: {{tag}})")
            else:
                literal.append(text[i])
                i += 1
        if literal:
            parts.append("".join(literal))
        self._parts = parts
        self._constant = "".join(parts) if all(isinstance(p, str) for p in parts) else None  # type: ignore[arg-type]

    def render(self, message: Message) -> str:
        """The key for ``message``; :class:`~connector.RejectedError` if it lacks a part."""
        if self._constant is not None:
            return self._constant
        return "".join(p if isinstance(p, str) else p.render(message) for p in self._parts)
