"""``${VAR}``, ``${VAR:-default}`` and ``${file:/path/to/secret}`` in string values.

``$${`` writes a literal ``${``. Values read from files lose one trailing newline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path as FsPath
from typing import Any

from .._errors import ConfigError
from .yaml_tree import Path, format_path

_PATTERN = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def interpolate(
    value: Any,
    lines: Mapping[Path, int],
    file: str,
    env: Mapping[str, str] | None = None,
    on_secret: Callable[[str], None] | None = None,
    path: Path = (),
) -> Any:
    """Expand references in every string below ``value``.

    ``on_secret`` receives every value read from a file, so that logging can
    redact it wherever it appears.
    """
    environ = os.environ if env is None else env
    if isinstance(value, dict):
        return {
            k: interpolate(v, lines, file, environ, on_secret, (*path, k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            interpolate(v, lines, file, environ, on_secret, (*path, i))
            for i, v in enumerate(value)
        ]
    if not isinstance(value, str) or "$" not in value:
        return value

    def fail(message: str) -> ConfigError:
        return ConfigError(message, file=file, line=lines.get(path), path=format_path(path))

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        expr = m.group(1)
        if expr.startswith("file:"):
            secret_path = expr[5:].strip()
            try:
                text = FsPath(secret_path).read_text()
            except OSError as exc:
                raise fail(
                    f"cannot read secret file {secret_path!r}: {exc.strerror or exc}"
                ) from None
            text = text[:-1] if text.endswith("\n") else text
            if on_secret is not None and text:
                on_secret(text)
            return text
        name, sep, default = expr.partition(":-")
        if not _NAME.match(name):
            raise fail(
                f"expected a variable reference such as ${{NAME}} or ${{NAME:-default}}, "
                f"found ${{{expr}}}"
            )
        found = environ.get(name)
        if found is not None and (found != "" or not sep):
            return found
        if sep:
            return default
        raise fail(
            f"undefined variable {name}: expected it set in the environment or a default "
            f"written ${{{name}:-value}}, found neither"
        )

    return _PATTERN.sub(replace, value)
