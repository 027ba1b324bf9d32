"""The soak with faults, shortened for CI: 60 s instead of 30 minutes, three
pairs, a fault every 12 s (a cut of every sink connection, a stall past the
sources' ack wait, 50 ms of latency). The full run is a documented command
(docs/reliability.md, "Soak"):

    .venv/bin/python -m bench.soak --minutes 30 --rate 300 --fault-every 120

Over a minute the RSS trend says little (the allocator is still settling), so its
bound is loosened here; what this checks is that every fault was injected, the
soak read every sink back, and nothing was lost.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import main

pytestmark = pytest.mark.integration


def test_short_soak_with_faults_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    code = main(["--minutes", "1", "--warmup", "0.5", "--rate", "100", "--interval", "5",
                 "--pairs", "jetstream:kafka,kafka:jetstream,redis_stream:jetstream",
                 "--fault-every", "12", "--faults", "cut,stall,latency",
                 "--max-rss-slope", "30", "--max-fd-slope", "30",
                 "--json", str(out), "--workdir", str(tmp_path)])
    result = json.loads(out.read_text())
    assert [f["fault"] for f in result["faults"]] == ["cut", "stall", "latency"], result["faults"]
    assert not any(f["what"].startswith("failed") for f in result["faults"]), result["faults"]
    for name, pair in result["per_pair"].items():
        assert pair["produced"] > 4000, (name, pair)
        assert pair["lost"] == 0, (name, pair)
    assert code == 0, result["failures"]
