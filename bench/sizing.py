"""How many messages a run sends, by message size.

A pair's count (200,000 by default) suits small messages; 64 KiB messages at
that count would be 12 GiB and minutes per run. Each run is held to a byte
budget instead: ``count = min(pair count, budget / size)``, never below a
floor that still gives a steady window.
"""

from __future__ import annotations

DEFAULT_SIZES = (128, 1024)  # `bench run` without --sizes; 65536 on request
BYTE_BUDGET = 256 * 2**20  # payload bytes per full run (200,000 x 1 KiB fits)
QUICK_BYTE_BUDGET = 16 * 2**20  # with --quick
MIN_COUNT = 2_000  # full runs
QUICK_MIN_COUNT = 500


def scaled_count(count: int, size: int, budget: int = BYTE_BUDGET,
                 minimum: int = MIN_COUNT) -> int:
    """``count`` messages of ``size`` bytes, cut to ``budget`` bytes, but at least
    ``minimum`` messages (and never more than ``count``)."""
    if size <= 0:
        raise ValueError("size must be positive")
    return min(count, max(minimum, budget // size))


def parse_sizes(text: str) -> list[int]:
    """``"128,1KiB,64k"`` → ``[128, 1024, 65536]`` (B, k/KiB, m/MiB suffixes)."""
    out = []
    for part in text.split(","):
        token = part.strip().lower().removesuffix("b").removesuffix("i")
        if not token:
            continue
        factor = 1
        if token[-1] in "km":
            factor = 1024 if token[-1] == "k" else 2**20
            token = token[:-1]
        try:
            value = int(token) * factor
        except ValueError:
            raise ValueError(f"not a message size: {part.strip()!r}") from None
        if value <= 0:
            raise ValueError(f"not a message size: {part.strip()!r}")
        out.append(value)
    if not out:
        raise ValueError("no message sizes given")
    return out
