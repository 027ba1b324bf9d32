"""``--workers``: how many, which pipelines each worker runs, and the merged view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from natsconn_nats.jetstream_source import JetStreamSource
from natsconn_nats.source import NatsSource

from connector.config import load_text
from connector.engine import workers
from connector.registry import Registry

from ._fakes import FakeSink


def test_usable_cores_honours_a_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert workers.usable_cores(tmp_path) == 1, "half a core is one worker"
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert workers.usable_cores(tmp_path) == min(2, workers.usable_cores(tmp_path / "none"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert workers.usable_cores(tmp_path) == workers.usable_cores(tmp_path / "none")


def test_usable_cores_honours_a_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert workers.usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert workers.usable_cores(tmp_path) == workers.usable_cores(tmp_path / "none")


def test_resolve() -> None:
    assert workers.resolve(None) == 1 and workers.resolve(3) == 3
    assert workers.resolve("auto") == workers.usable_cores()


def _file(*pipelines: dict[str, Any]) -> Any:
    registry = Registry.make_test_instance({
        "source": {"jetstream": JetStreamSource, "nats": NatsSource},
        "sink": {"fake": FakeSink}})
    text = yaml.safe_dump({"pipelines": list(pipelines)})
    return load_text(text, "f.yaml", registry, env={})


def test_only_shareable_sources_run_in_every_worker() -> None:
    loaded = _file(
        {"name": "durable", "source": {"type": "jetstream", "stream": "S"},
         "sink": {"type": "fake"}},
        {"name": "queue", "source": {"type": "nats", "subjects": ["a"], "queue_group": "q"},
         "sink": {"type": "fake"}},
        {"name": "plain", "source": {"type": "nats", "subjects": ["a"]},
         "sink": {"type": "fake"}},
    )
    names = [[p.spec.name for p in workers.for_worker(loaded, i, 3).pipelines]
             for i in range(3)]
    assert names == [["durable", "queue", "plain"], ["durable", "queue"], ["durable", "queue"]]
    assert workers.not_shared(loaded) == ["plain"]
    assert workers.for_worker(loaded, 0, 1) is loaded


def _status(name: str, state: str, written: float, history: list[list[float]],
            error: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "state": state, "connected": state == "running", "paused": False,
            "rates": {"read_per_second": 10.0, "written_per_second": written},
            "in_flight": {"messages": 5, "max_messages": 100, "bytes": 50, "max_bytes": 1000},
            "totals": {"read": 1.0, "written": written, "dead_lettered": 0.0, "filtered": 0.0,
                       "retries": 1.0},
            "lag": 7.0, "restarts": 1, "reloads": 0, "last_error": error,
            "sinks": [{"name": "s", "type": "fake", "when": None, "written": written,
                       "queued": 0.0, "dead_lettered": 0.0}],
            "history": history}


def test_merge_sums_figures_and_keeps_the_least_healthy_state() -> None:
    a = _status("p", "running", 100.0, [[1.0, 1.0, 2.0], [2.0, 3.0, 4.0]])
    b = _status("p", "failed", 50.0, [[2.0, 10.0, 20.0]],
                {"message": "boom", "at": "2026-01-01T00:00:00Z"})
    (merged,) = workers.merge_pipelines([[a], [b]])
    assert merged["state"] == "failed" and merged["connected"] is False
    assert merged["totals"]["written"] == 150.0 and merged["rates"]["written_per_second"] == 150
    assert merged["in_flight"] == {"messages": 10, "max_messages": 200, "bytes": 100,
                                   "max_bytes": 2000}
    assert merged["restarts"] == 2 and merged["lag"] == 7.0
    assert merged["last_error"]["message"] == "boom"
    assert merged["sinks"][0]["written"] == 150.0
    assert merged["history"] == [[2.0, 13.0, 24.0]], "summed over the samples both have"
    assert merged["workers"] == 2


@pytest.mark.parametrize("value", [0, 257])
def test_the_file_refuses_a_worker_count_out_of_range(value: int) -> None:
    from connector import ConfigError

    with pytest.raises(ConfigError, match="expected 1 to 256 workers"):
        load_text(yaml.safe_dump({"pipelines": [{"name": "p", "source": {"type": "generate"},
                                                  "sink": {"type": "drop"}}],
                                  "workers": value}), "f.yaml", env={})


async def test_the_event_loop_lag_is_measured() -> None:
    import asyncio
    import time

    from connector.ops import looplag
    from connector.ops.metrics import REGISTRY

    def counts() -> tuple[float, float]:
        total = REGISTRY.get_sample_value("natsconn_event_loop_lag_seconds_count") or 0.0
        quick = REGISTRY.get_sample_value("natsconn_event_loop_lag_seconds_bucket",
                                          {"le": "0.1"}) or 0.0
        return total, quick

    total0, quick0 = counts()
    task = asyncio.create_task(looplag.sample(0.01))
    await asyncio.sleep(0.02)
    time.sleep(0.2)  # noqa: ASYNC251 - the loop is blocked on purpose: the next tick is late
    await asyncio.sleep(0.03)
    task.cancel()
    total, quick = counts()
    assert total > total0
    assert total - total0 > quick - quick0, "one tick was over 0.1 s late"
