"""Where the kafka sink's record batches land: a keyed record on the partition
Kafka's default partitioner picks (the same one a raw aiokafka ``send()`` and
the Java client pick: murmur2 of the key), in order per key across several
record batches per partition and several writes; the keyless records of one
write together on one partition; headers byte for byte; and a record over
``max_request_size`` in the middle of a write refused alone."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from aiokafka.partitioner import murmur2
from natsconn_kafka.sink import KafkaSink

from connector import Message, PartialWriteError, RejectedError

from ..helpers import payload, seq_of
from .kafka_helpers import create_topic, produce, read_topic

pytestmark = pytest.mark.integration

PARTITIONS = 4
KEYS = [f"order-{n}" for n in range(23)]
WRITES, PER_WRITE = 3, 300
MAX_REQUEST = 16 * 1024


def java_partition(key: bytes) -> int:
    """Kafka's default partitioner for a keyed record: toPositive(murmur2(key)) % n."""
    return int(murmur2(key) & 0x7FFFFFFF) % PARTITIONS


def message(seq: int) -> Message:
    """Every third message keyless; the others keyed, cycling over KEYS. A header
    value with a byte that is not UTF-8 checks headers stay byte-exact."""
    key = KEYS[seq % len(KEYS)].encode() if seq % 3 else None
    headers = {"Seq": str(seq), "Raw": "x\udcff"}
    return Message(payload(seq), "orders.created", key, headers, time.time(), f"t:{seq}")


async def test_keyed_records_land_where_kafka_puts_the_key_in_order(kafka_bootstrap: str,
                                                                    unique: str) -> None:
    topic, raw_topic = f"keys-{unique}", f"keys-raw-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    await create_topic(kafka_bootstrap, raw_topic, partitions=PARTITIONS)
    # Small record batches: each partition gets several of them in one write.
    sink = KafkaSink.make_test_instance(
        bootstrap_servers=[kafka_bootstrap], topic=topic,
        max_batch_size="1KiB", max_request_size=MAX_REQUEST)
    too_big = PER_WRITE + PER_WRITE // 2  # in the middle of the second write
    written: list[int] = []
    await sink.connect()
    try:
        for w in range(WRITES):
            seqs = list(range(w * PER_WRITE, (w + 1) * PER_WRITE))
            batch = [message(s) for s in seqs]
            if too_big in seqs:
                m = batch[seqs.index(too_big)]
                batch[seqs.index(too_big)] = Message(m.data + b" " * MAX_REQUEST, m.subject,
                                                     m.key, m.headers, m.timestamp, m.id)
                with pytest.raises(PartialWriteError) as err:
                    await sink.write_batch(batch)
                assert set(err.value.failed) == {seqs.index(too_big)}, err.value.failed
                assert isinstance(err.value.failed[seqs.index(too_big)], RejectedError)
                seqs.remove(too_big)
            else:
                await sink.write_batch(batch)
            written += seqs
    finally:
        await sink.close()

    records = await read_topic(kafka_bootstrap, topic, len(written))
    assert sorted(seq_of(r.value) for r in records) == written  # all, once, not the big one

    # Where a raw aiokafka send() puts each key (its DefaultPartitioner, unsorted input).
    await produce(kafka_bootstrap, raw_topic, len(KEYS), key=lambda i: KEYS[i].encode(),
                  data=lambda i: KEYS[i].encode())
    raw = {r.value.decode(): r.partition
           for r in await read_topic(kafka_bootstrap, raw_topic, len(KEYS))}

    by_key: dict[bytes, list[int]] = defaultdict(list)
    keyless_partitions: dict[int, set[int]] = defaultdict(set)  # write -> partitions
    for r in records:
        seq = seq_of(r.value)
        assert r.headers == (("Seq", str(seq).encode()), ("Raw", b"x\xff"))
        if r.key is None:
            keyless_partitions[seq // PER_WRITE].add(r.partition)
            continue
        assert r.key == KEYS[seq % len(KEYS)].encode()
        assert r.partition == java_partition(r.key) == raw[r.key.decode()], (seq, r.key)
        by_key[r.key].append(seq)
    # read_topic returns each partition in offset order: per key, the order written.
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), key
    assert len(by_key) == len(KEYS)
    assert len({java_partition(k.encode()) for k in KEYS}) == PARTITIONS  # keys spread
    # One partition per write for keyless records; successive writes move on.
    assert all(len(parts) == 1 for parts in keyless_partitions.values()), keyless_partitions
    assert len(set().union(*keyless_partitions.values())) == WRITES
