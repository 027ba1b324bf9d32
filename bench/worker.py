"""A worker process: runs one raw leg, the engine alone, or timed traffic (an
open-loop sender, a latency receiver, round trips), and reports as JSON.

Protocol on stdout: ``READY`` once a consume leg or a receiver is subscribed
(the harness then starts the feed or the sender), and one final ``RESULT
<json>`` line (a Sample for legs and the engine, a dict for timed traffic).
Started as ``python -m bench.worker '<json spec>'`` by bench/runner.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from typing import Any

from . import timed
from .endpoint import Stopwatch
from .model import Params, Sample
from .registry import ENDPOINTS, load_all
from .schedule import Schedule


def use_loop(name: str) -> None:
    if name == "uvloop":
        import uvloop

        uvloop.install()


async def _ready() -> None:
    print("READY", flush=True)


async def run_leg(spec: dict[str, Any]) -> Sample:
    load_all()
    ep = ENDPOINTS[spec["endpoint"]](spec["env"])
    params = Params.from_json(spec["params"])
    if spec["mode"] == "produce":
        return await ep.produce(spec["technique"], spec["place"], params)
    return await ep.consume(spec["technique"], spec["place"], params, _ready)


async def run_engine(config: dict[str, Any]) -> Sample:
    """The engine as ``natsconn run`` drives it (Supervisor → Pipeline), minus the
    HTTP listener and signal handling, timed from the first read to the end."""
    from connector.config.loader import load_file
    from connector.engine.supervisor import Supervisor

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(config, f)
    loaded = load_file(f.name)
    supervisor = Supervisor(loaded, "bench")
    count = config["pipelines"][0]["source"]["count"]
    watch = Stopwatch()
    await supervisor.run()
    sample = watch.sample(count)
    failed = [f"{n}: {r.last_error}" for n, r in supervisor.records.items() if r.last_error]
    sample.notes += failed
    return sample


async def run_timed(spec: dict[str, Any]) -> dict[str, Any]:
    """``send``: the open-loop schedule into a source's place; ``receive``: a raw
    consumer of a sink's place recording latencies; ``round_trip``: one write and
    its acknowledgement, ``n`` times (ns each)."""
    load_all()
    mode, name, env = spec["mode"], spec["endpoint"], spec["env"]
    place, params = spec["place"], Params.from_json(spec["params"])
    if mode == "send":
        schedule = Schedule(time.time_ns() + int(spec.get("delay", 0.2) * 1e9),
                            spec["rate"], spec["count"])
        return await timed.SENDERS[name](env, place, params, schedule)
    if mode == "receive":
        arrivals = timed.Arrivals(spec["count"], spec.get("skip", 0), spec.get("idle", 5.0))
        await timed.RECEIVERS[name](env, place, params, arrivals, _ready)
        return arrivals.result()
    samples = await timed.ROUND_TRIPS[name](env, place, params, spec["n"])
    return {"round_trips_ns": samples}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    use_loop(spec.get("loop", "asyncio"))
    out: dict[str, Any]
    if spec["mode"] == "engine":
        out = asyncio.run(run_engine(spec["config"])).to_json()
    elif spec["mode"] in ("send", "receive", "round_trip"):
        out = asyncio.run(run_timed(spec))
    else:
        out = asyncio.run(run_leg(spec)).to_json()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
