"""Small JSON order records, each exactly ``size`` bytes, for ``generate``'s ``payload: json``.

A record is rendered as ``PREFIX + 12 sequence digits + suffix`` where the
suffix is one of ``POOL`` precomputed tails chosen by ``seq % POOL``: one
bytes formatting per message, so the generator stays cheap next to what it
feeds. The tails come from a fixed seed, so a run is the same every time::

    {"order_id":"000000000042","amount":12.34,"currency":"EUR","region":"eu",
     "customer":"c0042","items":["sku17"],"note":"xxxx"}

- ``order_id`` holds the sequence number: ``int(json.loads(data)["order_id"])``,
  or ``int(data[13:25])`` (always at that offset);
- ``amount`` is a float with two decimals, uniform in [1, 20): about half the
  records have ``amount > 10``;
- from ``FULL_SIZE`` bytes on, four more fields (``status``, ``channel``,
  ``gift``, ``created_at``) make a 10-field record;
- ``items`` is a list of one SKU (one to three in the 10-field record);
- ``note`` pads the record to ``size`` bytes.

Pure: used by the ``generate`` source and by bench/ to preload JetStream.
"""

from __future__ import annotations

import json
import random
from typing import Any, Final

PREFIX: Final = b'{"order_id":"'
POOL: Final = 1024
SEED: Final = 20261202
SEQ_DIGITS: Final = 12
SEQ_OFFSET: Final = len(PREFIX)  # data[13:25] are the sequence digits
_PAD: Final = ',"note":""'

_REGIONS = ("eu", "us", "apac", "latam")
_CURRENCIES = ("EUR", "USD", "GBP", "JPY")
_STATUSES = ("new", "paid", "packed", "shipped")
_CHANNELS = ("web", "app", "shop")


def _fields(rng: random.Random, full: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "amount": round(rng.uniform(1.0, 19.99), 2),
        "currency": rng.choice(_CURRENCIES),
        "region": rng.choice(_REGIONS),
        "customer": f"c{rng.randrange(10_000):04d}",
        "items": [f"sku{rng.randrange(100)}" for _ in range(rng.randint(1, 3) if full else 1)],
    }
    if full:
        fields |= {"status": rng.choice(_STATUSES), "channel": rng.choice(_CHANNELS),
                   "gift": rng.random() < 0.1,
                   "created_at": 1_764_000_000_000 + rng.randrange(10**9)}
    return fields


def _tail(fields: dict[str, Any]) -> str:
    out = []
    for name, value in fields.items():
        text = json.dumps(value, separators=(",", ":"))
        if isinstance(value, float):
            text = f"{value:.2f}"  # always a float in JSON: 12.30, never 12.3 or 12
        out.append(f',"{name}":{text}')
    return '"' + "".join(out)


def _tails(full: bool) -> list[str]:
    rng = random.Random(SEED)
    return [_tail(_fields(rng, full)) for _ in range(POOL)]


def _longest(full: bool) -> int:
    return len(PREFIX) + SEQ_DIGITS + max(map(len, _tails(full))) + len(_PAD) + 1


MIN_SIZE: Final = _longest(False)
"""The smallest ``size`` a JSON record fits in (6 fields and an empty note)."""
FULL_SIZE: Final = _longest(True)
"""From this ``size`` on, records have the 10 fields."""


def tails(size: int) -> list[bytes]:
    """The ``POOL`` suffixes (after the sequence digits) of records of ``size`` bytes."""
    if size < MIN_SIZE:
        raise ValueError(f"a JSON record needs at least {MIN_SIZE} bytes, size is {size}")
    out = []
    for tail in _tails(size >= FULL_SIZE):
        note = size - len(PREFIX) - SEQ_DIGITS - len(tail) - len(_PAD) - 1
        out.append(f'{tail},"note":"{"x" * note}"}}'.encode())
    return out


def record(seq: int, tails: list[bytes]) -> bytes:
    """Record number ``seq`` (its tail is ``tails[seq % len(tails)]``)."""
    return PREFIX + b"%012d" % seq + tails[seq % len(tails)]
