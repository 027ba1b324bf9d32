"""bench/legs/kv.py's pure parts: bucket names, keys, the put batches."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from natsconn_nats.kv_source import VALID_BUCKET

from bench.legs.kv import SINK_KEY, batches, bucket_name, key_of


def test_a_bucket_name_is_a_valid_kv_bucket() -> None:
    name = bucket_name("ab12-cd.x", "source")
    assert name == "BENCH_AB12-CD_X_SOURCE"
    assert VALID_BUCKET.fullmatch(name)


def test_a_source_place_has_distinct_keys_and_a_sink_place_one() -> None:
    assert [key_of({"bucket": "B"}, s) for s in range(3)] == ["k.0", "k.1", "k.2"]
    assert {key_of({"bucket": "B", "key": SINK_KEY}, s) for s in range(3)} == {SINK_KEY}


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=3_000))
def test_batches_cover_every_put_once_in_order(count: int, size: int) -> None:
    plan = batches(count, size)
    seqs = [s for first, k in plan for s in range(first, first + k)]
    assert seqs == list(range(count))
    assert all(1 <= k <= size for _, k in plan)
