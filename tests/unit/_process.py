"""Helpers for the natsconn_process tests: pipelines from YAML with the fake
source and sinks of _fakes.py and the real processing transforms."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import yaml
from natsconn_process.compress import Compress
from natsconn_process.decompress import Decompress
from natsconn_process.filter import Filter
from natsconn_process.headers import Headers
from natsconn_process.mapping import Mapping
from natsconn_process.split import Split

from connector import Message, Transform
from connector.config import load_text
from connector.engine import Pipeline, PipelineState
from connector.ops.metrics import REGISTRY as METRICS
from connector.registry import Registry

from ._fakes import FakeSink, FakeSource, pipeline_spec

REGISTRY = Registry.make_test_instance({
    "source": {"fake": FakeSource},
    "sink": {"fake": FakeSink},
    "transform": {"filter": Filter, "mapping": Mapping, "headers": Headers, "split": Split,
                  "compress": Compress, "decompress": Decompress},
})


def make_pipeline(**spec: Any) -> Pipeline:
    """A pipeline written as a pipeline file would be, validated the same way."""
    doc = {"pipelines": [pipeline_spec(**spec)], "http": {"enabled": False}}
    loaded = load_text(yaml.safe_dump(doc, sort_keys=False), "test.yaml", REGISTRY, env={})
    return Pipeline(loaded.pipelines[0])


def parts(pipe: Pipeline) -> tuple[FakeSource, FakeSink]:
    return cast(FakeSource, pipe.source), cast(FakeSink, pipe.sink)


def dlq(pipe: Pipeline) -> FakeSink:
    assert pipe.dead_letter is not None
    return cast(FakeSink, pipe.dead_letter)


def sample(name: str, pipe: Pipeline, **labels: str) -> float:
    return METRICS.get_sample_value(name, {"pipeline": pipe.name, **labels}) or 0.0


async def finish(pipe: Pipeline, task: asyncio.Task[None] | None = None,
                 timeout: float = 5.0) -> None:
    """End the fake source's input and wait for the pipeline to drain and finish."""
    source, _ = parts(pipe)
    source.end()
    await asyncio.wait_for(task if task is not None else pipe.run(), timeout)
    assert pipe.state is PipelineState.FINISHED


class CountingMeters:
    """Meters that record every filtered() call."""

    def __init__(self) -> None:
        self.filtered_calls: list[int] = []

    def dropped(self, count: int, reason: str) -> None:
        raise AssertionError("a transform reported lost messages")

    def filtered(self, count: int) -> None:
        self.filtered_calls.append(count)

    def reconnected(self) -> None:
        return None

    def disconnected(self) -> None:
        return None

    def lag(self, messages: int) -> None:
        return None


def run(transform: Transform[Any], *messages: Message) -> list[Any]:
    """``process`` over ``messages``, as a plain list."""
    out = transform.process(list(messages))
    assert isinstance(out, list)
    return out
