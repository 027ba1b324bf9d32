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
    return parse(fetch(url, timeout))


def buckets(text: str, name: str, by: str) -> dict[str, list[tuple[float, float]]]:
    """A histogram's cumulative buckets, ``(le, count)`` in order, per value of the
    label ``by`` (summed over the other labels; ``""`` when the label is absent)."""
    out: dict[str, dict[float, float]] = {}
    prefix = name + "_bucket"
    for line in text.splitlines():
        if not line.startswith(prefix + "{"):
            continue
        labels_part, _, value = line.rpartition(" ")
        labels = dict(_labels(labels_part[len(prefix) + 1:-1]))
        le = float(labels.get("le", "+Inf"))
        key = labels.get(by, "")
        per = out.setdefault(key, {})
        per[le] = per.get(le, 0.0) + float(value)
    return {k: sorted(v.items()) for k, v in out.items()}


def _labels(body: str) -> list[tuple[str, str]]:
    pairs = []
    for part in body.split('",'):
        key, _, val = part.partition("=")
        pairs.append((key.strip(), val.strip().strip('"')))
    return pairs


def quantile(cumulative: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket the rank falls in;
    the last finite bound when it falls in +Inf. None when nothing was observed."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if le == float("inf"):
                return lower_le
            span = count - lower_count
            frac = 0.0 if span <= 0 else (rank - lower_count) / span
            return lower_le + (le - lower_le) * frac
        lower_le, lower_count = le, count
    return lower_le


def fetch(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())
