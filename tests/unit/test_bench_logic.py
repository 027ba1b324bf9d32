"""The benchmark harness's pure parts: histogram, open-loop schedule, count scaling,
metrics parsing (nothing timed here)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.hdr import Histogram
from bench.latency import stage_line, stage_summary
from bench.prom import buckets, parse, quantile
from bench.schedule import MIN_SIZE, Schedule, read_stamp, stamp
from bench.sizing import parse_sizes, scaled_count

# ---------------------------------------------------------------- histogram


@given(st.integers(min_value=0, max_value=10**13))
def test_a_value_lies_within_its_bucket_whose_width_is_bounded(value: int) -> None:
    h = Histogram(sub_bits=8)
    low, high = h.bounds(h.index(value))
    assert low <= value <= high
    assert high - low <= max(0, value) / 128  # 1 / 2**(sub_bits-1) of the value


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=10**12))
def test_buckets_are_ordered_like_their_values(a: int, b: int) -> None:
    h = Histogram()
    if a <= b:
        assert h.index(a) <= h.index(b)
    else:
        assert h.index(a) >= h.index(b)


def test_buckets_are_contiguous() -> None:
    h = Histogram(sub_bits=4)
    previous_high = -1
    for i in range(200):
        low, high = h.bounds(i)
        assert low == previous_high + 1
        assert h.index(low) == i and h.index(high) == i
        previous_high = high


def test_percentiles_of_one_to_ten_thousand() -> None:
    h = Histogram()
    for v in range(1, 10_001):
        h.record(v * 1000)  # 1 µs .. 10 ms in ns
    for p, exact in ((50, 5_000_000), (99, 9_900_000), (99.9, 9_990_000)):
        got = h.percentile(p)
        assert got is not None
        assert exact <= got <= exact * (1 + 1 / 128)
    assert h.percentile(100) == 10_000_000 == h.max
    assert h.percentile(0) == 1000 == h.min
    assert h.count == 10_000
    assert h.mean == pytest.approx(5_000_500)


def test_a_rare_outlier_shows_at_the_tail_only() -> None:
    h = Histogram()
    h.record(1_000_000, times=999)
    h.record(500_000_000)
    assert h.percentile(99) == pytest.approx(1_000_000, rel=1 / 128)
    assert h.percentile(99.9) == pytest.approx(1_000_000, rel=1 / 128)
    assert h.percentile(99.95) == 500_000_000


def test_empty_histogram_has_no_percentiles_and_bad_input_is_refused() -> None:
    h = Histogram()
    assert h.percentile(50) is None and h.mean is None
    with pytest.raises(ValueError):
        h.percentile(101)
    h.record(-5)  # a clock step backwards counts as zero, not an error
    assert h.min == 0


def test_merge_and_json_round_trip_keep_everything() -> None:
    a, b = Histogram(), Histogram()
    for v in range(100):
        a.record(v * 7919)
        b.record(v * 104729)
    a.merge(b)
    back = Histogram.from_json(a.to_json())
    assert back.count == 200 and back.max == 99 * 104729 and back.min == 0
    assert back.percentile(99) == a.percentile(99)
    with pytest.raises(ValueError):
        a.merge(Histogram(sub_bits=4))


# ---------------------------------------------------------------- schedule


def test_schedule_intended_times_are_evenly_spaced() -> None:
    s = Schedule(start_ns=1_000_000_000, rate=1000.0, count=5000)
    assert s.intended(0) == 1_000_000_000
    assert s.intended(1) == 1_001_000_000
    assert s.intended(4999) == s.end_ns == 1_000_000_000 + 4_999_000_000


def test_schedule_due_counts_messages_whose_time_has_come() -> None:
    s = Schedule(start_ns=0, rate=1000.0, count=10)
    assert s.due(-1) == 0
    assert s.due(0) == 1  # message 0 is due at the start
    assert s.due(999_999) == 1
    assert s.due(1_000_000) == 2
    assert s.due(10**12) == 10  # never more than count


@given(st.floats(min_value=0.5, max_value=2e6), st.integers(min_value=0, max_value=10**10))
def test_schedule_due_agrees_with_intended(rate: float, now: int) -> None:
    s = Schedule(start_ns=12345, rate=rate, count=10**9)
    n = s.due(now)
    if n > 0:
        assert s.intended(n - 1) <= now
    assert s.intended(n) > now


def test_chunks_cover_a_backlog_in_order_and_bounded() -> None:
    s = Schedule(start_ns=0, rate=1e6, count=10_000)
    chunks = s.chunks(sent=100, now_ns=2_499_999, limit=1000)  # due: 2500
    assert chunks == [(100, 1000), (1100, 1000), (2100, 400)]
    assert s.chunks(sent=2500, now_ns=2_499_999, limit=1000) == []


def test_schedule_refuses_a_rate_that_is_not_positive() -> None:
    for rate in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError):
            Schedule(0, rate, 1)


def test_stamp_round_trip() -> None:
    data = stamp(42, 1_700_000_000_123_456_789, b"x" * (128 - MIN_SIZE))
    assert len(data) == 128
    assert read_stamp(data) == (42, 1_700_000_000_123_456_789)
    assert read_stamp(memoryview(data)) == (42, 1_700_000_000_123_456_789)


# ---------------------------------------------------------------- sizing


def test_scaled_count_keeps_small_messages_and_cuts_large_ones() -> None:
    budget = 256 * 2**20
    assert scaled_count(200_000, 128, budget) == 200_000
    assert scaled_count(200_000, 1024, budget) == 200_000
    assert scaled_count(200_000, 65536, budget) == 4096
    assert scaled_count(200_000, 2**20, budget, minimum=2000) == 2000  # the floor
    assert scaled_count(1000, 2**20, budget, minimum=2000) == 1000  # never above count


def test_parse_sizes_accepts_suffixes_and_refuses_nonsense() -> None:
    assert parse_sizes("128,1024,65536") == [128, 1024, 65536]
    assert parse_sizes("128B, 1KiB, 64k, 1MiB") == [128, 1024, 65536, 2**20]
    for bad in ("", "abc", "0", "12x"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


# ---------------------------------------------------------------- metrics


def test_parse_metrics_sums_label_sets_and_skips_comments() -> None:
    text = """# HELP natsconn_in_flight_messages Messages read but not yet acknowledged
# TYPE natsconn_in_flight_messages gauge
natsconn_in_flight_messages{pipeline="a"} 1200.0
natsconn_in_flight_messages{pipeline="b"} 300.0
natsconn_dropped_total{pipeline="a",reason="slow consumer"} 3.0
process_resident_memory_bytes 5.24288e+07
"""
    values = parse(text)
    assert values["natsconn_in_flight_messages"] == 1500.0
    assert values["natsconn_dropped_total"] == 3.0
    assert values["process_resident_memory_bytes"] == 52428800.0


# ---------------------------------------------------------------- arrivals, verdicts


def test_arrivals_skip_the_warm_up_count_duplicates_and_ignore_foreign_payloads() -> None:
    from bench.timed import Arrivals

    a = Arrivals(expect=4, skip=1)
    filler = b"." * 16
    a.add(stamp(0, 1_000, filler), now_ns=9_000)  # warm-up: counted, not in the histogram
    a.add(stamp(1, 2_000, filler), now_ns=5_000)
    a.add(stamp(1, 2_000, filler), now_ns=6_000)  # a duplicate
    a.add(b"short", now_ns=6_000)
    a.add(stamp(99, 2_000, filler), now_ns=6_000)  # not from this run's sender
    a.add(stamp(2, 3_000, filler), now_ns=10_000)
    assert not a.done
    a.add(stamp(3, 4_000, filler), now_ns=4_500)
    assert a.done
    r = a.result()
    assert (r["received"], r["duplicates"], r["foreign"]) == (4, 1, 2)
    h = Histogram.from_json(r["histogram"])
    assert h.count == 3 and h.min == 500 and h.max == 7_000


def _level(fraction: float, p99_ms: float) -> Any:
    from bench.latency import Level

    h = Histogram()
    h.record(int(p99_ms * 1e6), times=100)
    return Level(fraction, 1000.0, 100, {"sent": 100, "rate": 1000.0},
                 {"received": 100, "rate": 1000.0, "histogram": h.to_json()}, 0.1, 0)


def test_latency_target_is_linger_plus_two_round_trips_plus_5ms_at_half_load() -> None:
    from bench.latency import PairLatency
    from bench.model import Params

    r = PairLatency("a->b", 128, Params(size=128, count=1, max_wait=0.02), 1e5, "given",
                    [2_000_000, 3_000_000, 4_000_000])  # median 3 ms
    assert r.target_ms == pytest.approx(20 + 2 * 3 + 5)
    r.levels = [_level(0.1, 50.0), _level(0.5, 30.0), _level(0.8, 500.0)]
    assert r.holds is True  # only the 50 % level counts
    r.levels[1] = _level(0.5, 32.0)
    assert r.holds is False
    again = PairLatency.from_json(r.to_json())
    assert again.holds is False and again.target_ms == r.target_ms


def _stall(samples: list[tuple[str, int, int, dict[str, int]]], count: int = 100) -> Any:
    from bench.stall import StallResult

    rows = [{"phase": ph, "rss": rss, "in_flight": fl, "in_flight_bytes": fl * 10,
             "delivered": d, "backlog": bl}
            for ph, rss, fl, bl, d in ((*s, i * 40) for i, s in enumerate(samples))]
    return StallResult("a->b", 128, count, 5.0, rows, bound_messages=50)


def test_stall_verdict_reads_rss_in_flight_and_held_back() -> None:
    r = _stall([("flowing", 10, 20, {"num_pending": 80}),
                ("stalled", 30, 50, {"num_pending": 60}),
                ("stalled", 25, 50, {"num_pending": 60}),
                ("resumed", 20, 0, {"num_pending": 0})])
    assert (r.rss_before, r.rss_peak, r.rss_after) == (10, 30, 20)
    assert r.in_flight_max == 50 and r.held_back is True
    assert r.delivered == 120 and r.ok
    drained = _stall([("flowing", 10, 20, {"lag": 5}), ("stalled", 30, 60, {"lag": 0})],
                     count=1000)
    assert drained.held_back is False
    assert not drained.ok  # over the bound, and not everything delivered


def test_stall_is_not_held_back_when_natsconn_kept_reading() -> None:
    r = _stall([("flowing", 10, 20, {"num_pending": 900}),
                ("stalled", 30, 50, {"num_pending": 800}),
                ("stalled", 30, 50, {"num_pending": 700}),
                ("stalled", 30, 50, {"num_pending": 700})], count=1000)
    for row, seen in zip(r.samples, (100, 130, 140, 140), strict=True):
        row["messages_in"] = seen
    assert r.read_while_stalled == 40 and r.reading_stopped and r.held_back is True
    r.samples[3]["messages_in"] = 400  # still reading late in the stall
    assert r.reading_stopped is False and r.held_back is False


_STAGES = """\
# TYPE natsconn_batch_stage_seconds histogram
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="s",stage="writing",le="0.001"} 10.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="s",stage="writing",le="0.002"} 90.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="s",stage="writing",le="0.01"} 100.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="s",stage="writing",le="+Inf"} 100.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="t",stage="writing",le="0.001"} 0.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="t",stage="writing",le="0.002"} 0.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="t",stage="writing",le="0.01"} 100.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="t",stage="writing",le="+Inf"} 100.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="s",stage="batching",le="0.001"} 0.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="s",stage="batching",le="0.002"} 0.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="s",stage="batching",le="0.01"} 0.0
natsconn_batch_stage_seconds_bucket{pipeline="p",sink="s",stage="batching",le="+Inf"} 4.0
natsconn_batch_stage_seconds_count{pipeline="p",sink="s",stage="writing"} 100.0
natsconn_event_loop_lag_seconds_bucket{le="0.001"} 3.0
natsconn_event_loop_lag_seconds_bucket{le="0.01"} 4.0
natsconn_event_loop_lag_seconds_bucket{le="+Inf"} 4.0
"""


def test_histogram_buckets_are_summed_over_the_other_labels_and_kept_in_order() -> None:
    got = buckets(_STAGES, "natsconn_batch_stage_seconds", "stage")
    assert got["writing"] == [(0.001, 10.0), (0.002, 90.0), (0.01, 200.0),
                              (math.inf, 200.0)]
    assert set(got) == {"writing", "batching"}
    assert buckets(_STAGES, "natsconn_event_loop_lag_seconds", "stage") == {
        "": [(0.001, 3.0), (0.01, 4.0), (math.inf, 4.0)]}


def test_quantile_interpolates_within_the_bucket_like_histogram_quantile() -> None:
    cumulative = [(0.001, 10.0), (0.002, 90.0), (0.01, 100.0), (math.inf, 100.0)]
    assert quantile(cumulative, 0.05) == pytest.approx(0.0005)  # 5 of the first 10
    assert quantile(cumulative, 0.5) == pytest.approx(0.0015)  # 40 of 80 in (1, 2] ms
    assert quantile(cumulative, 0.99) == pytest.approx(0.0092)  # 9 of 10 in (2, 10] ms
    # all in +Inf: the last finite bound, as Prometheus answers
    assert quantile([(0.01, 0.0), (math.inf, 4.0)], 0.5) == 0.01
    assert quantile([(0.01, 0.0), (math.inf, 0.0)], 0.5) is None
    assert quantile([], 0.5) is None


def test_stage_summary_reads_the_stages_and_the_loop_lag_in_milliseconds() -> None:
    got = stage_summary(_STAGES)
    assert got["writing"]["count"] == 200.0
    assert got["writing"]["p50_ms"] == pytest.approx(2 + 8 * (100 - 90) / 110)
    assert got["loop_lag"]["p99_ms"] == pytest.approx(1 + 9 * (3.96 - 3))
    assert stage_line(got) == (f"batching 10.0 / writing {got['writing']['p99_ms']:.1f} / "
                               f"loop_lag {got['loop_lag']['p99_ms']:.1f} ms")
