"""The harness's `--workers` and `--go-bridge-terms` logic: process trees, CPU per
member, the Go-bridge figures, the implied ceilings, and their report sections
(nothing timed here, one short-lived process tree)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bench.legs.kafka import Kafka
from bench.legs.nats import CoreNats, JetStream
from bench.model import Params, Sample, Stats, bridge_terms, ceiling, parse_workers, parts_delta
from bench.procs import ProcTree, descendants, env_value
from bench.registry import Pair
from bench.report import bridge_rows, go_bridge, scaling, worker_cores
from bench.runner import Measured, PairResult, preloads

# ------------------------------------------------------------- process trees


def test_descendants_walks_the_whole_tree_parents_first_each_once() -> None:
    tree = {1: [2, 3], 2: [4], 3: [4, 5], 5: [1]}  # 4 reported twice, a cycle back to 1
    order = descendants(1, lambda pid: tree.get(pid, []))
    assert order[0] == 1
    assert sorted(order) == [1, 2, 3, 4, 5]
    assert len(order) == len(set(order))
    assert order.index(2) < order.index(4)


def test_descendants_of_a_lone_process_is_itself() -> None:
    assert descendants(7, lambda _pid: []) == [7]


def test_env_value_reads_one_variable_of_a_proc_environ() -> None:
    environ = b"PATH=/bin\0NATSCONN_WORKER_INDEX=3\0X=a=b\0"
    assert env_value(environ, "NATSCONN_WORKER_INDEX") == "3"
    assert env_value(environ, "X") == "a=b"
    assert env_value(environ, "NATSCONN_WORKER") is None
    assert env_value(b"", "PATH") is None


def test_parts_delta_counts_new_members_from_zero_and_leaves_gone_ones_out() -> None:
    before = {"parent": 1.0, "w0": 2.0, "w1": 3.0}
    after = {"parent": 1.5, "w0": 4.0, "w2": 0.5}  # w1 died and was replaced by w2
    assert parts_delta(before, after) == {"parent": 0.5, "w0": 2.0, "w2": 0.5}
    assert parts_delta({"w0": 2.0}, {"w0": 1.0}) == {"w0": 0.0}  # never negative


BURN = ("import os, subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import time\\n"
        "t = time.process_time()\\nwhile time.process_time() - t < 0.6: pass\\n"
        "time.sleep(30)'], env={**os.environ, 'NATSCONN_WORKER_INDEX': str(i)})"
        " for i in range(2)]\n"
        "print('up', flush=True)\n"
        "time.sleep(30)\n")


@contextlib.contextmanager
def _tree_of(script: str) -> Iterator[int]:
    """A process running ``script`` in a session of its own, once it printed "up";
    yields its pid, and kills the whole session at the end."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"up"
        yield proc.pid
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_proc_tree_sums_the_parent_and_its_workers_by_label() -> None:
    with _tree_of(BURN) as pid:
        tree = ProcTree(pid, rescan=0.0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            total = tree.cpu()
            if {"w0", "w1"} <= tree.last_parts.keys() and min(
                    tree.last_parts["w0"], tree.last_parts["w1"]) >= 0.55:
                break
            time.sleep(0.1)
        parts = tree.last_parts
        assert set(parts) == {"parent", "w0", "w1"}
        assert parts["w0"] >= 0.55 and parts["w1"] >= 0.55
        assert total == pytest.approx(sum(parts.values()))
        assert tree.hwm() > 0


LATE_EXEC = ("import os, sys, time\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    time.sleep(1.0)\n"  # between fork and exec: still the parent's environ
             "    os.execve(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)'],"
             " {**os.environ, 'NATSCONN_WORKER_INDEX': '0'})\n"
             "print('up', flush=True)\n"
             "time.sleep(30)\n")


def test_proc_tree_labels_a_worker_seen_before_its_exec_once_it_has_execd() -> None:
    with _tree_of(LATE_EXEC) as pid:
        tree = ProcTree(pid, rescan=0.0)
        early = tree.parts()
        assert "w0" not in early and len(early) == 2  # the child is there, not yet a worker
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "w0" not in tree.parts():
            time.sleep(0.05)
        assert set(tree.parts()) == {"parent", "w0"}


# ------------------------------------------------------------ the Go bridge


def test_bridge_terms_count_distinct_arrivals_over_first_publish_to_last_arrival() -> None:
    t = bridge_terms(published=1000, arrived=990, distinct=980, first_publish=10.0,
                     last_arrival=12.0, cpu=0.049)
    assert t["lost"] == 20
    assert t["duplicates"] == 10
    assert t["rate"] == pytest.approx(490.0)
    assert t["cpu_per_message"] == pytest.approx(0.049 / 980)
    assert t["distinct_checked"]


def test_bridge_terms_without_a_read_back_count_every_record_as_distinct() -> None:
    t = bridge_terms(published=100, arrived=100, distinct=None, first_publish=0.0,
                     last_arrival=0.0, cpu=0.0)
    assert (t["lost"], t["duplicates"], t["rate"], t["distinct_checked"]) == (0, 0, 0.0, False)


def test_ceiling_is_cores_over_cpu_per_message() -> None:
    assert ceiling(5e-6, 4) == pytest.approx(800_000)
    assert ceiling(5e-6, 8) == pytest.approx(1_600_000)
    assert ceiling(0.0, 4) == 0.0


def test_parse_workers() -> None:
    assert parse_workers("1,2,4") == [1, 2, 4]
    assert parse_workers(" 2, 1 ,2,") == [2, 1]
    for bad in ("0", "x", "1,-2", "", "257"):
        with pytest.raises(ValueError):
            parse_workers(bad)


# ------------------------------------------------------------------ reports


def _sample(rate: float, parts: dict[str, float], bridge: dict[str, object] | None = None
            ) -> Sample:
    return Sample(messages=int(rate), seconds=1.0, cpu_seconds=sum(parts.values()),
                  peak_rss=0, delivered=int(rate), parts=parts, bridge=bridge)


def test_worker_cores_orders_the_parent_then_the_workers_by_index() -> None:
    samples = [_sample(100, {"w10": 0.2, "parent": 0.1, "w2": 0.9}),
               _sample(100, {"w10": 0.4, "parent": 0.1, "w2": 0.7})]
    cores = worker_cores(samples)
    assert list(cores) == ["parent", "w2", "w10"]
    assert cores["w2"] == pytest.approx(0.8)


def _result(workers: int, samples: list[Sample]) -> PairResult:
    params = Params(size=128, count=100, workers=workers)
    return PairResult(Pair("nats", "kafka"), 128, params,
                      Measured("pipeline", "nats->kafka", "natsconn run", params,
                               Stats(samples)))


def test_scaling_section_lists_each_worker_count_with_its_per_worker_cpu() -> None:
    rows = [_result(1, [_sample(100_000, {"parent": 0.8})]),
            _result(2, [_sample(150_000, {"parent": 0.05, "w0": 0.6, "w1": 0.55})])]
    text = "\n".join(scaling(rows))
    assert "| nats->kafka | 128 B | 2 | 150.0k" in text
    assert "1.20 / 0.05 / 0.60 + 0.55" in text
    assert "| 8.00 |" in text  # 1.2 s / 150,000 messages
    assert "500.0k | 1.00M" in text  # 4 and 8 cores at 8 µs/msg
    assert scaling([_result(0, [_sample(1, {})])]) == []  # without --workers: no section


def test_go_bridge_section_takes_medians_and_the_worst_loss() -> None:
    def terms(rate: float, lost: int) -> dict[str, object]:
        return {"rate": rate, "cpu_per_message": 4e-6, "published": 200_000, "lost": lost,
                "duplicates": 0, "distinct_checked": True, "publisher": "full speed",
                "publisher_rate": 300_000.0, "per_partition": [1, 2, 3]}

    r = _result(2, [_sample(1, {}, terms(190_000, 0)), _sample(1, {}, terms(200_000, 5)),
                    _sample(1, {}, terms(210_000, 0))])
    b = bridge_rows(r)
    assert b is not None
    assert (b["rate"], b["lost"], b["runs"]) == (200_000, 5, 3)
    text = "\n".join(go_bridge([r]))
    assert "| nats->kafka | 128 B | 2 | 200.0k (190.0k-210.0k) | 200,000 (min) | 5 (max)" in text
    assert "4.00" in text and "1, 2, 3" in text
    assert go_bridge([_result(1, [_sample(1, {})])]) == []


def test_a_kafka_source_is_fed_after_readiness_only_under_several_workers() -> None:
    # preloaded, the first worker would drain the topic while the others join the group
    for workers, expected in ((0, True), (1, True), (2, False), (4, False)):
        assert preloads(Kafka, Params(size=128, count=100, workers=workers)) is expected
    assert preloads(JetStream, Params(size=128, count=100, workers=4))  # one durable
    assert not preloads(CoreNats, Params(size=128, count=100, workers=0))  # live feed
