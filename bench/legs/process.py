"""The processing layer: transforms measured beside the same pipeline without them.

Each pair here is a **variant** (bench/registry.py): a pipeline with
``transforms``, measured in turns with its baseline (the same source, sink and
JSON payloads without the transforms), in the same run. The engine-only ones
(generate → drop) give the transforms' cost per message in µs; the bridge one
(jetstream → nats) the ratio of the two rates.

Payloads are JSON order records (natsconn_dev/orders.py): at 128 B six fields
(order_id, amount, currency, region, customer, items) and a padding note;
from 215 B ten fields. About half have ``amount > 10``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from natsconn_dev import orders

from ..registry import Pair, pair

ORDER_SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "order.avsc"

FILTER: dict[str, Any] = {"type": "filter", "when": "data.amount > 10"}
SUBJECT_FILTER: dict[str, Any] = {"type": "filter", "when": 'subject.startsWith("orders.1")'}
# Five fields: three computed, one renamed, one removed.
MAPPING: dict[str, Any] = {
    "type": "mapping",
    "set": {"amount_cents": "int(data.amount * 100.0)",
            "region_code": "data.region.upperAscii()",
            "priority": 'data.amount > 10.0 ? "high" : "normal"'},
    "rename": {"customer": "customer_id"},
    "remove": ["currency"],
}
# Every record has amount >= 1: each message is tested and none is dropped, so the
# sink writes as many messages as in the pipeline without transforms.
KEEP_ALL_FILTER: dict[str, Any] = {"type": "filter", "when": "data.amount > 0"}
AVRO_ENCODE: dict[str, Any] = {"type": "encode", "format": "avro",
                               "schema_file": str(ORDER_SCHEMA)}


def engine(variant: str, transforms: tuple[dict[str, Any], ...], target_cost: float,
           about: str, min_size: int = orders.MIN_SIZE) -> Pair:
    """generate (JSON records) → transforms → drop, the engine alone, beside
    generate → drop on the same records."""
    return pair(Pair("generate", "drop", count=500_000, quick_count=100_000,
                     engine_only=True, target_rate=None, target_ratio=None, default=False,
                     variant=variant, transforms=transforms, payload="json",
                     target_cost=target_cost, min_size=min_size, about=about))


engine("filter", (FILTER,), 1.0, "filter when: data.amount > 10 (about half kept)")
engine("subject_filter", (SUBJECT_FILTER,), 1.0,
       'filter when: subject.startsWith("orders.1") (11 of 20 subjects kept)')
engine("mapping", (MAPPING,), 3.0, "mapping: set 3 computed fields, rename 1, remove 1")
engine("avro", (AVRO_ENCODE,), 3.0, "encode: JSON to Avro, 10-field record, schema_file",
       min_size=orders.FULL_SIZE)
pair(Pair("jetstream", "nats", variant="process", transforms=(KEEP_ALL_FILTER, MAPPING),
          target_ratio=0.8, payload="json", min_size=orders.MIN_SIZE, default=False,
          about="filter when: data.amount > 0 (keeps all), then the 5-field mapping"))
