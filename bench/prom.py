"""Reading natsconn's /metrics (Prometheus text format) without a client library."""

from __future__ import annotations

import urllib.request


def parse(text: str) -> dict[str, float]:
    """Sample values by metric name, summed over label sets (``# `` lines skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        if not name:
            continue
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse(resp.read().decode())
