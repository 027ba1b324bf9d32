"""The processing benchmark's pure parts: the JSON order records, the generator's
``payload: json``, variants and their baselines, the with/without comparison and
its table (nothing timed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from natsconn_dev import orders
from natsconn_dev.generate import GenerateConfig, GenerateSource
from pydantic import ValidationError

from bench import report
from bench.model import Params, Sample, Stats, compare
from bench.registry import PAIRS, Pair, load_all
from bench.runner import Measured, PairResult, keep_quietest
from connector import EndOfInput

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------- records


@pytest.mark.parametrize("size", [orders.MIN_SIZE, 128, orders.FULL_SIZE - 1,
                                  orders.FULL_SIZE, 1024])
def test_every_record_is_json_of_exactly_size_bytes_with_its_sequence(size: int) -> None:
    tails = orders.tails(size)
    for seq in (0, 1, 41, orders.POOL, 123_456_789_012 % 10**12):
        data = orders.record(seq, tails)
        assert len(data) == size
        doc = json.loads(data)
        assert int(doc["order_id"]) == seq
        assert int(data[orders.SEQ_OFFSET:orders.SEQ_OFFSET + 12]) == seq
        assert isinstance(doc["amount"], float)
        fields = set(doc) - {"note"}
        assert len(fields) == (10 if size >= orders.FULL_SIZE else 6)


def test_about_half_the_records_have_an_amount_above_10() -> None:
    tails = orders.tails(128)
    above = sum(json.loads(orders.record(i, tails))["amount"] > 10 for i in range(orders.POOL))
    assert 0.4 < above / orders.POOL < 0.6


def test_records_are_the_same_every_run_and_smaller_sizes_are_refused() -> None:
    assert orders.tails(200) == orders.tails(200)
    assert orders.MIN_SIZE <= 128 < orders.FULL_SIZE
    with pytest.raises(ValueError, match=f"at least {orders.MIN_SIZE} bytes"):
        orders.tails(orders.MIN_SIZE - 1)


def test_generate_refuses_json_in_too_small_a_payload() -> None:
    with pytest.raises(ValidationError, match=f"needs size >= {orders.MIN_SIZE}"):
        GenerateConfig(payload="json", size=64)
    assert GenerateConfig(size=64).payload == "random"


async def test_generate_json_payloads_and_subjects_by_modulo() -> None:
    source = GenerateSource(GenerateConfig(payload="json", size=128, count=30,
                                           subject="orders.{mod}", modulo=20))
    await source.connect()
    batch = await source.read_batch(100, 0.01)
    assert batch is not None
    messages = batch.messages
    assert [int(json.loads(m.data)["order_id"]) for m in messages] == list(range(30))
    assert {len(m.data) for m in messages} == {128}
    assert [m.subject for m in messages[19:22]] == ["orders.19", "orders.0", "orders.1"]


async def test_generate_random_payloads_are_unchanged() -> None:
    source = GenerateSource(GenerateConfig(size=40, count=2, subject="s.{seq}.{mod}"))
    await source.connect()
    batch = await source.read_batch(10, 0.01)
    assert batch is not None
    first, second = batch.messages
    assert first.data[:12] == b"000000000000" and second.data[:12] == b"000000000001"
    assert len(first.data) == 40 and first.data[12:] == second.data[12:]
    assert second.subject == "s.1.1"


async def test_generate_keys_ids_headers_and_a_constant_subject_across_reads() -> None:
    source = GenerateSource(GenerateConfig(size=16, count=5, subject="const", key="k-{mod}",
                                           modulo=2, headers={"h": "v"}))
    await source.connect()
    first = await source.read_batch(3, 0.01)
    second = await source.read_batch(3, 0.01)
    assert first is not None and second is not None
    messages = first.messages + second.messages
    assert [m.data[:12] for m in messages] == [b"%012d" % i for i in range(5)]
    assert [m.key for m in messages] == [b"k-0", b"k-1", b"k-0", b"k-1", b"k-0"]
    assert [m.id for m in messages] == [f"gen-{i}" for i in range(5)]
    assert {m.subject for m in messages} == {"const"}
    assert all(m.headers == {"h": "v"} and m.timestamp for m in messages)
    with pytest.raises(EndOfInput):
        await source.read_batch(3, 0.01)


# ------------------------------------------------------------------ variants


def test_a_variant_is_named_after_its_transforms_and_has_a_plain_baseline() -> None:
    variant = Pair("generate", "drop", engine_only=True, variant="filter",
                   transforms=({"type": "filter", "when": "true"},), payload="json",
                   target_cost=1.0, target_ratio=None)
    assert variant.name == "generate->drop+filter"
    base = variant.baseline
    assert base is not None and base.name == "generate->drop"
    assert base.transforms == () and base.payload == "json" and base.engine_only
    assert base.baseline is None and base.target_cost is None


def test_the_processing_pairs_are_registered() -> None:
    load_all()
    for name in ("generate->drop+filter", "generate->drop+subject_filter",
                 "generate->drop+mapping", "generate->drop+avro", "jetstream->nats+process"):
        assert name in PAIRS
        assert PAIRS[name].transforms and PAIRS[name].payload == "json"
    assert PAIRS["generate->drop+avro"].min_size == orders.FULL_SIZE


def _sample(rate: float, cpu_us: float, other: float = 0.0, n: int = 1_000_000) -> Sample:
    return Sample(n, n / rate, n * cpu_us / 1e6, 0, other_cores=other)


def test_compare_takes_cost_cpu_and_ratio_per_run_pair() -> None:
    without = [_sample(1e6, 1.0), _sample(1e6, 1.0), _sample(2e6, 0.5)]
    with_ = [_sample(5e5, 2.0), _sample(2.5e5, 4.0), _sample(1e6, 1.0)]
    c = compare(with_, without)
    assert c is not None and c.pairs == 3
    # costs per pair: 1 µs, 3 µs, 0.5 µs
    assert c.cost == pytest.approx(1e-6)
    assert c.cost_min == pytest.approx(0.5e-6) and c.cost_max == pytest.approx(3e-6)
    assert c.cpu_cost == pytest.approx(1e-6)
    assert c.ratio == pytest.approx(0.5)
    assert (c.ratio_min, c.ratio_max) == (pytest.approx(0.25), pytest.approx(0.5))


def test_compare_skips_runs_that_timed_nothing() -> None:
    assert compare([], []) is None
    assert compare([Sample(0, 0.0, 0.0, 0)], [_sample(1e6, 1.0)]) is None


def test_the_quietest_rounds_are_kept_in_the_order_they_ran() -> None:
    rounds = [[_sample(1e6, 1, other=o1), _sample(1e6, 1, other=o2)]
              for o1, o2 in ((0.1, 0.9), (0.2, 0.1), (0.0, 0.0), (0.3, 0.2))]
    kept, dropped = keep_quietest(rounds, 3)
    assert kept == [rounds[1], rounds[2], rounds[3]]
    assert dropped == [rounds[0]]


def _result(variant: Pair, with_: list[Sample], without: list[Sample]) -> PairResult:
    params = Params(size=128, count=1_000_000, payload="json")
    kind = "engine" if variant.engine_only else "pipeline"
    base = variant.baseline
    assert base is not None
    return PairResult(variant, 128, params, Measured(kind, variant.name, "x", params,
                                                     Stats(with_)),
                      baseline=Measured(kind, base.name, "x", params, Stats(without)))


def test_a_variant_holds_its_cost_or_ratio_target() -> None:
    cheap = Pair("generate", "drop", engine_only=True, variant="f", transforms=({},),
                 target_cost=1.0, target_ratio=None)
    without = [_sample(1e6, 1.0)] * 3
    assert _result(cheap, [_sample(4e5, 2.0)] * 3, without).holds is False  # +1.5 µs
    assert _result(cheap, [_sample(6e5, 1.6)] * 3, without).holds is True  # +0.67 µs
    bridge = Pair("jetstream", "nats", variant="p", transforms=({},), target_ratio=0.8)
    assert _result(bridge, [_sample(8.5e5, 1.0)] * 3, without).holds is True
    assert _result(bridge, [_sample(7e5, 1.0)] * 3, without).holds is False


def test_the_processing_table_gives_both_rates_the_cost_and_survives_a_reload(
        tmp_path: Path) -> None:
    load_all()
    variant = PAIRS["generate->drop+filter"]
    result = _result(variant, [_sample(4e5, 3.0)] * 3, [_sample(1e6, 1.0)] * 3)
    cond = {"git": "abc"}
    text = report.markdown([result], cond)
    row = next(line for line in text.splitlines() if line.startswith("| generate->drop+filter"))
    assert "400.0k" in row and "1.00M" in row and "+1.50" in row and "+2.00" in row
    assert "<= 1 µs: **no**" in row and "0.40" in row
    main = text.split("## Processing")[0]
    assert "generate->drop+filter" not in main
    json_path, _md = report.write([result], cond, tmp_path)
    loaded, _ = report.load(json_path)
    assert loaded[0].baseline is not None
    assert loaded[0].comparison == result.comparison


def test_list_and_run_know_the_processing_group() -> None:
    listed = subprocess.run([sys.executable, "-m", "bench", "list"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "generate->drop+mapping" in listed.stdout
    assert "beside generate->drop" in listed.stdout
    helped = subprocess.run([sys.executable, "-m", "bench", "run", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert "processing" in helped.stdout
