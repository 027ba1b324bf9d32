"""Human-readable durations (``50ms``, ``30s``) and sizes (``1MiB``) for configs."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_DURATION_UNITS = {
    "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
    "k": 1024, "m": 1024**2, "g": 1024**3,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h|d)\s*$")
_NUMBER_RE = re.compile(r"^\d+(?:\.\d+)?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from ``1.5``, ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``; ``"1m30s"`` too."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '50ms' or '30s', found {value!r}")
    if isinstance(value, int | float):
        if not value >= 0 or value == float("inf"):  # also catches NaN
            raise ValueError(f"expected a finite duration >= 0, found {value!r}")
        return float(value)
    if isinstance(value, str):
        total = 0.0
        rest = value.strip()
        if not rest:
            raise ValueError("expected a duration such as '50ms' or '30s', found ''")
        if _NUMBER_RE.match(rest):
            # Plain seconds as text: what ``${TIMEOUT:-30}`` interpolates to.
            return float(rest)
        for part in re.findall(r"\d+(?:\.\d+)?\s*(?:us|µs|ms|s|m|h|d)|.+?", rest):
            m = _DURATION_RE.match(part)
            if not m:
                raise ValueError(
                    f"expected a duration such as '50ms', '30s' or '5m', found {value!r}"
                )
            total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        return total
    raise ValueError(f"expected a duration such as '50ms' or '30s', found {value!r}")


def parse_size(value: Any) -> int:
    """Bytes from ``1024``, ``"64KiB"``, ``"1MiB"``, ``"10MB"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '1MiB', found {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size >= 0, found {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f"expected a size such as 65536, '64KiB' or '1MiB', found {value!r}")


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {
                    "type": "string",
                    "pattern": r"^\s*((\d+(\.\d+)?\s*(us|µs|ms|s|m|h|d)\s*)+|\d+(\.\d+)?\s*)$",
                },
            ],
            "description": "seconds, or a duration such as '50ms', '30s', '5m'",
        }
    ),
]
"""Seconds, written as a number or as ``'50ms'``, ``'30s'``, ``'5m'``."""

ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kKmMgG][iI]?[bB]?|[bB])?\s*$"},
            ],
            "description": "bytes, or a size such as '64KiB', '1MiB', '10MB'",
        }
    ),
]
"""Bytes, written as an integer or as ``'64KiB'``, ``'1MiB'``."""
