"""A worker process: runs one raw leg, or the engine alone, and reports as JSON.

Protocol on stdout: ``READY`` once a consume leg is subscribed (the harness
then starts the live feed), and one final ``RESULT <json Sample>`` line.
Started as ``python -m bench.worker '<json spec>'`` by bench/runner.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from typing import Any

from .endpoint import Stopwatch
from .model import Params, Sample
from .registry import ENDPOINTS, load_all


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


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    use_loop(spec.get("loop", "asyncio"))
    if spec["mode"] == "engine":
        sample = asyncio.run(run_engine(spec["config"]))
    else:
        sample = asyncio.run(run_leg(spec))
    print("RESULT " + json.dumps(sample.to_json()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
