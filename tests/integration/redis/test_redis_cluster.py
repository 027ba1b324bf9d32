"""The Redis plugins against a Redis Cluster (``cluster: true``): six Debian
redis-server nodes, 3 masters and 3 replicas, from ``scripts/services start
redis-cluster`` (part of ``all``).

* The stream, list and kv sinks write keys spread over every master, and a key
  template with a hash tag (``{{tag}}``) puts its keys in one slot.
* The stream source (two streams in one slot) and the list source (queue and
  processing list in one slot) read and acknowledge on the cluster; keys in
  different slots are refused at configuration time, and a plain client on a
  cluster node at connect.
* A master fails over mid-stream and nothing acknowledged is lost:
  ``redis_stream → jetstream`` with ``kill -9`` of the stream's master (its
  replica takes over), and ``jetstream → redis_stream`` with a manual
  ``CLUSTER FAILOVER``. Sequence numbers are compared as sets; duplicates are
  counted and printed (``pytest -s``). The killed node is started again by
  ``scripts/services start redis-cluster`` and rejoins as a replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from natsconn_redis.kv_sink import RedisKvSink
from natsconn_redis.list_sink import RedisListSink
from natsconn_redis.list_source import RedisListSource
from natsconn_redis.stream_sink import RedisStreamSink
from natsconn_redis.stream_source import RedisStreamSource
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from connector import ConnectorError, Message
from connector.testing.kit import collect

from ..helpers import (
    create_stream,
    natsconn_process,
    payload,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    wait_until,
)
from .redis_helpers import fill_stream, pending

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
N_FAILOVER = int(os.environ.get("NATSCONN_REDIS_CLUSTER_FAILOVER_N", "20000"))
# Small batches, one in flight: slow enough that the failover lands mid-stream.
FLOW: dict[str, Any] = {"batch": {"max_messages": 100, "max_wait": "10ms"},
                        "max_in_flight": 1}
# Restart a pipeline soon after its source or sink lost the master.
RESTART = {"restart_backoff": "200ms", "restart_backoff_max": "1s"}


def cluster_url() -> str:
    return os.environ.get("NATSCONN_REDIS_CLUSTER_URL") or "redis://127.0.0.1:7001"


@pytest.fixture
async def rc() -> AsyncIterator[RedisCluster]:
    """A raw cluster client, after checking that the cluster is whole."""
    url = cluster_url()
    client = RedisCluster.from_url(url, socket_timeout=10)
    try:
        info: Any = await client.cluster_info()
    except Exception as exc:
        await client.aclose()
        pytest.fail(f"no Redis Cluster at {url} ({exc}). Start it with `scripts/services "
                    "start redis-cluster`.", pytrace=False)
    if info.get("cluster_state") != "ok":
        await client.aclose()
        pytest.fail(f"the Redis Cluster at {url} is not ok ({info.get('cluster_state')}); "
                    "run `scripts/services start redis-cluster`", pytrace=False)
    yield client
    await client.aclose()


@pytest.fixture
async def keys(rc: RedisCluster, unique: str) -> AsyncIterator[str]:
    """The test's key prefix ``it:<unique>:``; its keys are deleted afterwards."""
    prefix = f"it:{unique}:"
    yield prefix
    found = [k async for k in rc.scan_iter(match=f"*{prefix}*", count=1000)]
    for key in found:
        await rc.delete(key)


def cfg(**options: Any) -> dict[str, Any]:
    return {"url": cluster_url(), "cluster": True, **options}


def masters_of(rc: RedisCluster, names: list[str]) -> set[str]:
    return {rc.nodes_manager.get_node_from_slot(key_slot(k.encode())).name for k in names}


# ------------------------------------------------------------------ plugins


async def test_sinks_spread_over_the_masters(rc: RedisCluster, keys: str) -> None:
    messages = [Message(payload(i), f"orders.p{i % 30}", key=b"k%d" % i, id=f"m{i}")
                for i in range(300)]
    stream = RedisStreamSink.make_test_instance(**cfg(stream=f"{keys}s.{{subject[-1]}}"))
    lists = RedisListSink.make_test_instance(**cfg(key=f"{keys}l.{{subject[-1]}}"))
    kv = RedisKvSink.make_test_instance(**cfg(key=f"{keys}kv.{{id}}", ttl="5m"))
    hashes = RedisKvSink.make_test_instance(**cfg(key=f"{keys}h.{{subject[-1]}}",
                                                  command="hset", field="{id}"))
    tagged = RedisStreamSink.make_test_instance(
        **cfg(stream=f"{{{{{keys}tag}}}}:{{subject[-1]}}"))
    sinks = [stream, lists, kv, hashes, tagged]
    for sink in sinks:
        await sink.connect()
    try:
        for sink in sinks:
            await sink.write_batch(messages)
    finally:
        for sink in sinks:
            await sink.close()
    parts = [f"p{i}" for i in range(30)]
    assert sum([await rc.xlen(f"{keys}s.{p}") for p in parts]) == 300
    assert sum([await rc.llen(f"{keys}l.{p}") for p in parts]) == 300
    assert await rc.get(f"{keys}kv.m7") == payload(7)
    assert 0 < await rc.ttl(f"{keys}kv.m7") <= 300
    assert await rc.hget(f"{keys}h.p7", "m7") == payload(7)
    # Untagged keys land on every master; the tagged ones share one slot.
    assert len(masters_of(rc, [f"{keys}s.{p}" for p in parts])) == 3
    tagged_keys = [f"{{{keys}tag}}:{p}" for p in parts]
    assert len({key_slot(k.encode()) for k in tagged_keys}) == 1
    assert sum([await rc.xlen(k) for k in tagged_keys]) == 300


async def test_sources_read_and_ack(rc: RedisCluster, keys: str) -> None:
    tag = f"{{{keys}src}}"
    streams = [f"{tag}:a", f"{tag}:b"]
    for i, s in enumerate(streams):
        await fill_stream(rc, s, 100, start=i * 100)  # type: ignore[arg-type]
    source = RedisStreamSource.make_test_instance(**cfg(streams=streams, group="g",
                                                        consumer="c1"))
    await source.connect()
    try:
        got = await collect(source, 200, timeout=20)
    finally:
        await source.close()
    assert sorted(seq_of(m.data) for m in got) == list(range(200))
    for s in streams:
        assert await pending(rc, s, "g") == 0  # type: ignore[arg-type]

    queue = f"{tag}:q"
    await rc.lpush(queue, *[payload(i) for i in range(200)])
    lsource = RedisListSource.make_test_instance(**cfg(key=queue, consumer="c1",
                                                       claim_interval="1s"))
    await lsource.connect()
    try:
        got = await collect(lsource, 200, timeout=20)
    finally:
        await lsource.close()
    assert sorted(seq_of(m.data) for m in got) == list(range(200))
    assert await rc.llen(queue) == 0
    assert await rc.llen(f"{queue}:processing:c1") == 0


async def test_keys_in_different_slots_refused(rc: RedisCluster, keys: str) -> None:
    with pytest.raises(ValidationError, match="one slot"):
        RedisStreamSource.make_test_instance(**cfg(streams=[f"{keys}a", f"{keys}b"],
                                                   max_deliveries=0))
    with pytest.raises(ValidationError, match="dead_letter_stream"):
        RedisStreamSource.make_test_instance(**cfg(streams=[f"{keys}a"]))
    RedisStreamSource.make_test_instance(**cfg(streams=[f"{keys}a"], max_deliveries=0))
    with pytest.raises(ValidationError, match="hash tag"):
        RedisListSource.make_test_instance(**cfg(key=f"{keys}q"))
    with pytest.raises(ValidationError, match="database 0"):
        RedisListSource.make_test_instance(**cfg(key="{q}", url=cluster_url() + "/2"))
    # A plain client on a cluster node is refused at connect, not with MOVED later.
    plain = RedisStreamSink.make_test_instance(url=cluster_url(), stream=f"{keys}x")
    with pytest.raises(ConnectorError, match="set cluster: true"):
        await plain.connect()
    await plain.close()


# ----------------------------------------------------------------- failover


async def _master_and_replica(rc: RedisCluster, key: str) -> tuple[int, int]:
    """Ports of the master serving ``key``'s slot and of one of its replicas."""
    await rc.nodes_manager.initialize()
    master = rc.nodes_manager.get_node_from_slot(key_slot(key.encode()))
    nodes: Any = await rc.cluster_nodes()
    master_id = nodes[f"{master.host}:{master.port}"]["node_id"]
    for addr, info in nodes.items():
        if info.get("master_id") == master_id and "slave" in info["flags"]:
            return int(master.port), int(addr.split(":")[1])
    raise AssertionError(f"master {master.name} has no replica: {nodes}")


async def _run(*argv: str, timeout: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}: {out.decode()}"
    return out.decode()


async def _cli(port: int, *args: str) -> str:
    return await _run("redis-cli", "-p", str(port), *args, timeout=10)


async def _role(port: int) -> str:
    try:
        return (await _cli(port, "role")).split("\n", 1)[0].strip()
    except AssertionError:
        return "down"


async def _pid(port: int) -> int:
    for line in (await _cli(port, "info", "server")).splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":")[1])
    raise AssertionError(f"no process_id from the node on {port}")


async def _restore_cluster() -> None:
    """Start the node a test killed (it rejoins as a replica); wait for state ok."""
    await _run(str(ROOT / "scripts" / "services"), "start", "redis-cluster")


async def _await_count(fetch: Any, want: set[int], timeout: float) -> list[int]:
    seqs: list[int] = []

    async def enough() -> bool:
        nonlocal seqs
        seqs = await fetch()
        return want <= set(seqs)

    try:
        await wait_until(enough, timeout, "every sequence number")
    except AssertionError:
        missing = sorted(want - set(seqs))
        raise AssertionError(f"{len(missing)} of {len(want)} missing after {timeout}s "
                             f"(first {missing[:10]})") from None
    return seqs


def _report(what: str, seqs: list[int], n: int, took: float) -> int:
    counts = Counter(seqs)
    dupes = sum(c - 1 for c in counts.values())
    assert set(counts) == set(range(n)), f"{what}: unexpected sequence numbers"
    print(f"\n{what}: {n} messages, 0 lost, {dupes} duplicates "
          f"({len({s for s, c in counts.items() if c > 1})} sequence numbers twice or more); "
          f"{took:.1f}s from the failover to the last message")
    return dupes


async def test_master_killed_mid_stream_redis_to_jetstream(
        rc: RedisCluster, keys: str, nc: NATS, nats_url: str, unique: str,
        tmp_path: Path) -> None:
    """redis_stream → jetstream; kill -9 of the stream's master after a quarter."""
    n = N_FAILOVER
    stream, target = f"{{{keys}fo}}:in", f"RC_FO_{unique}"
    await fill_stream(rc, stream, n)  # type: ignore[arg-type]
    master, replica = await _master_and_replica(rc, stream)
    # The entries themselves must survive the kill: wait until the replica has them.
    await rc.execute_command("WAIT", 1, 10_000, target_nodes=rc.get_node_from_key(stream))
    await create_stream(nc, target, [f"rcfo.{unique}"])
    file = pipeline_file(tmp_path, [
        {"name": "from-cluster", **FLOW,
         "source": {"type": "redis_stream", **cfg(streams=[stream], group="g",
                                                  consumer="c1", min_idle_time="3s",
                                                  claim_interval="1s", max_deliveries=0,
                                                  socket_timeout="3s")},
         # dedupe off: every redelivery shows as a duplicate in the stream, counted.
         "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"rcfo.{unique}",
                  "dedupe": False}},
    ], **RESTART)

    async def delivered() -> list[int]:
        return [seq_of(m.data) for m in await read_stream(nc, target, timeout=30)]

    async with natsconn_process(file) as proc:
        await wait_until(lambda: _count(nc, target, n // 4), 60, "a quarter through")
        os.kill(await _pid(master), signal.SIGKILL)
        killed = time.monotonic()
        try:
            await wait_until(lambda: _is_master(replica), 30,
                             f"replica {replica} promoted after master {master} was killed")
            promoted = time.monotonic() - killed
            await wait_until(lambda: _count(nc, target, n), 60, f"{n} in {target}")
            took = time.monotonic() - killed
        finally:
            await _restore_cluster()
        await wait_until(lambda: _pending_zero(rc, stream), 30, "XPENDING 0")
        status, state = await proc.readyz()
        assert status == 200, state
    seqs = await _await_count(delivered, set(range(n)), 30)
    _report(f"kill -9 of master {master} (replica {replica} promoted in {promoted:.1f}s), "
            "redis_stream → jetstream", seqs, n, took)


async def test_manual_failover_mid_stream_jetstream_to_redis(
        rc: RedisCluster, keys: str, nc: NATS, nats_url: str, unique: str,
        tmp_path: Path) -> None:
    """jetstream → redis_stream; CLUSTER FAILOVER of the stream's slot mid-stream."""
    n = N_FAILOVER
    source, stream = f"RC_IN_{unique}", f"{{{keys}fo2}}:out"
    await create_stream(nc, source, [f"rcin.{unique}"])
    await publish_js(nc, f"rcin.{unique}", n)
    master, replica = await _master_and_replica(rc, stream)
    file = pipeline_file(tmp_path, [
        {"name": "to-cluster", **FLOW,
         "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                    "durable": "to-cluster", "ack_wait": "30s"},
         # {{...}} is a literal brace in a key template: the hash tag.
         "sink": {"type": "redis_stream",
                  **cfg(stream=stream.replace("{", "{{").replace("}", "}}"),
                        socket_timeout="3s")}},
    ], **RESTART)

    async def written() -> list[int]:
        entries: Any = await rc.xrange(stream)
        return [seq_of(fields[b"data"]) for _, fields in entries]

    async with natsconn_process(file) as proc:
        await wait_until(lambda: _xlen_at_least(rc, stream, n // 4), 60, "a quarter through")
        failed_over = time.monotonic()
        answer = await _cli(replica, "cluster", "failover")
        assert answer.strip() == "OK", answer
        await wait_until(lambda: _is_master(replica), 30, f"replica {replica} promoted")
        promoted = time.monotonic() - failed_over
        seqs = await _await_count(written, set(range(n)), 60)
        took = time.monotonic() - failed_over
        info = await nc.jetstream().consumer_info(source, "to-cluster")
        await wait_until(lambda: _js_drained(nc, source), 30, "every message acked")
        status, state = await proc.readyz()
        assert status == 200, state
    assert await _role(master) == "slave", "the old master should follow the new one"
    assert info is not None
    _report(f"CLUSTER FAILOVER to replica {replica} (promoted in {promoted:.1f}s), "
            "jetstream → redis_stream", seqs, n, took)


async def _count(nc: NATS, stream: str, at_least: int) -> bool:
    try:
        info = await nc.jetstream().stream_info(stream)
    except Exception:
        return False
    return int(info.state.messages) >= at_least


async def _xlen_at_least(rc: RedisCluster, stream: str, n: int) -> bool:
    try:
        return int(await rc.xlen(stream)) >= n
    except Exception:
        return False


async def _is_master(port: int) -> bool:
    return await _role(port) == "master"


async def _pending_zero(rc: RedisCluster, stream: str) -> bool:
    try:
        return await pending(rc, stream, "g") == 0  # type: ignore[arg-type]
    except Exception:
        return False


async def _js_drained(nc: NATS, stream: str) -> bool:
    info = await nc.jetstream().consumer_info(stream, "to-cluster")
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)
