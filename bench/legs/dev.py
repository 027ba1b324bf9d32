"""The dev plugins: ``generate`` → ``drop`` measures the engine alone.

No raw legs and no far side: the pipeline runs inside a worker process (the
engine as ``natsconn run`` drives it, without the HTTP listener) and is
judged by its rate against ``target_rate``.
"""

from __future__ import annotations

from typing import Any

from ..endpoint import Endpoint
from ..model import Params, Place
from ..registry import Pair, endpoint, pair


@endpoint
class Generate(Endpoint):
    name = "generate"
    system = "none"

    async def create(self, tag: str, params: Params, role: str) -> Place:
        return {}

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        # A constant subject and no ids: the engine's cost, not the generator's formatting.
        block = {"type": "generate", "count": params.count, "size": params.size,
                 "subject": "bench.generated", "ids": False}
        if params.payload == "json":
            # JSON order records on 20 subjects (orders.0 … orders.19: a subject filter
            # on "orders.1" keeps 11 of 20), made once each (natsconn_dev.orders).
            block |= {"payload": "json", "subject": "orders.{mod}", "modulo": 20}
        return block


@endpoint
class Drop(Endpoint):
    name = "drop"
    system = "none"

    async def create(self, tag: str, params: Params, role: str) -> Place:
        return {}

    def sink_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "drop"}


pair(Pair("generate", "drop", count=2_000_000, quick_count=200_000, engine_only=True,
          target_rate=1_000_000, target_ratio=None))
