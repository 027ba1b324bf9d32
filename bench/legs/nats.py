"""Core NATS and JetStream: endpoints, raw legs written with nats-py, and pairs.

Raw legs use nats-py's public API the fastest way we know, without natsconn
(on connections with ``skip_subject_validation``: they publish only to a
constant subject and to reply subjects the server gave):

- core publish: publish a batch, then one ``flush()`` (PING/PONG) per batch.
- core subscribe: a callback subscription that counts.
- JetStream publish: every message of a batch published at once with the
  batch's reply subject on one long-lived inbox wildcard; PubAcks counted by a
  callback; ``max_in_flight`` batches outstanding. One round trip per batch.
- JetStream pull: a durable pull consumer read through one long-lived inbox
  with pull requests issued ahead of need (never nats-py's ``fetch()``, which
  waits a round trip per batch), the plugin's window (``prefetch`` messages
  within ``prefetch_bytes``, each request capped by bytes); every message
  acked (``+ACK``) per batch.
- JetStream push: a durable push consumer delivering to a callback; same acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import time
import urllib.request
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from ..endpoint import Endpoint, Ready, Stopwatch, peak_rss
from ..model import Params, Place, Sample
from ..registry import Pair, endpoint, pair

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_MONITOR = "http://127.0.0.1:8222"
# The nats source's defaults (plugins/natsconn_nats/source.py), so drops compare.
CORE_PENDING_MSGS = 512 * 1024
CORE_PENDING_BYTES = 128 * 1024 * 1024
IDLE_END = 3.0  # a live-fed consumer stops this long after the last message
SEQ_DIGITS = 12  # payload "seq": each payload starts with its number, 12 ASCII digits


async def connect(env: dict[str, str], name: str, trusted_subjects: bool = True) -> NATS:
    """A raw leg's connection. ``trusted_subjects``: skip nats-py's per-publish subject
    check (a regex per call); the legs publish to one constant subject and to reply
    subjects the server gave, so there is nothing to check."""
    nc = NATS()
    await nc.connect(servers=[env.get("NATS_URL", DEFAULT_URL)], name=name,
                     pending_size=64 * 1024 * 1024, max_reconnect_attempts=0,
                     allow_reconnect=False, skip_subject_validation=trusted_subjects)
    return nc


def payload(size: int) -> bytes:
    return os.urandom(size)


def payloads(params: Params) -> bytes | list[bytes]:
    """What a produce leg writes: one random payload for every message, or with
    ``payload: json`` the count's JSON order records (as ``generate`` makes them,
    made before the clock starts)."""
    if params.payload != "json":
        return payload(params.size)
    from natsconn_dev import orders

    tails = orders.tails(params.size)
    return [orders.record(seq, tails) for seq in range(params.count)]


def _status(msg: Msg) -> str | None:
    """The status code of a JetStream control message (no data, Status header)."""
    headers = msg.headers
    if headers is not None and not msg.data and "Status" in headers:
        return headers["Status"]
    return None


class _NatsBase(Endpoint):
    system = "nats"
    address_env = "NATS_URL"
    default_url = DEFAULT_URL

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.url = env.get("NATS_URL", DEFAULT_URL)
        self.monitor = env.get("NATS_MONITOR_URL", DEFAULT_MONITOR)
        self._nc: NATS | None = None

    async def open(self) -> None:
        self._nc = await connect(self.env, "bench-admin", trusted_subjects=False)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "open() first"
        return self._nc

    def describe(self) -> dict[str, str]:
        info = {"nats-py": importlib.metadata.version("nats-py")}
        if self._nc is not None:
            v = self._nc.connected_server_version
            info["nats-server"] = f"{v.major}.{v.minor}.{v.patch}"
        return info


# --------------------------------------------------------------------------- core


@endpoint
class CoreNats(_NatsBase):
    """Core NATS subjects: at most once, so a source needs a live feed."""

    name = "nats"
    durable = False
    gives_ids = False
    produce_legs = {"flush_per_batch": "publish a batch, then flush() once (PING/PONG)"}
    consume_legs = {"callback": "subscribe with a callback that counts"}
    feed_technique = "flush_per_batch"

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self._cids: dict[str, list[int]] = {}

    async def create(self, tag: str, params: Params, role: str) -> Place:
        # --workers N: N sink connections under the same name, each counted
        return {"subject": f"bench.{tag}.core", "conn_name": f"bench-{tag}-{role}",
                "conns": max(1, params.workers)}

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "nats", "servers": [self.url],
                                 "subjects": [place["subject"]]}
        if params.workers:  # workers share a core NATS subject only in a queue group
            block["queue_group"] = f"{place['conn_name']}-q"
        return block

    def sink_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "nats", "servers": [self.url], "subject": place["subject"],
                "name": place["conn_name"]}

    async def delivered(self, place: Place) -> int:
        """Messages the server received from natsconn's sink connection (/connz
        in_msgs): with core NATS, the server having it is the far side."""
        name, wanted = place["conn_name"], place.get("conns", 1)
        cids = self._cids.get(name)
        if cids is None or len(cids) < wanted:
            conns = await asyncio.to_thread(self._connz, "limit=100000")
            mine = [c for c in conns if c.get("name") == name]
            if mine:
                self._cids[name] = [int(c["cid"]) for c in mine]
            return sum(int(c.get("in_msgs", 0)) for c in mine)
        total = 0
        for cid in cids:
            conns = await asyncio.to_thread(self._connz, f"cid={cid}")
            total += int(conns[0].get("in_msgs", 0)) if conns else 0
        return total

    def _connz(self, query: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.monitor}/connz?{query}", timeout=5) as resp:
            conns: list[dict[str, Any]] = json.load(resp).get("connections") or []
            return conns

    # ---- raw legs

    async def produce_flush_per_batch(self, place: Place, params: Params) -> Sample:
        nc = await connect(self.env, "bench-core-produce")
        subject, data = place["subject"], payloads(params)
        publish, n, batch = nc.publish, params.count, params.batch
        seq_tail = data[SEQ_DIGITS:] if isinstance(data, bytes) else b""
        numbered = params.payload == "seq"
        watch = Stopwatch()
        sent = 0
        while sent < n:
            k = min(batch, n - sent)
            if isinstance(data, list):
                for seq in range(sent, sent + k):
                    await publish(subject, data[seq])
            elif numbered:
                for seq in range(sent, sent + k):
                    await publish(subject, b"%012d" % seq + seq_tail)
            else:
                for _ in range(k):
                    await publish(subject, data)
            await nc.flush(timeout=30)
            sent += k
            if params.pace > 0:  # paced: the next batch when its time comes
                wait = watch.t0 + sent / params.pace - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
        sample = watch.sample(sent, notes=[f"paced at {params.pace:,.0f} msg/s"]
                              if params.pace > 0 else [])
        await nc.close()
        return sample

    async def consume_callback(self, place: Place, params: Params, ready: Ready) -> Sample:
        nc = await connect(self.env, "bench-core-consume")
        n = params.count
        count = 0
        first = last = cpu_first = 0.0
        done = asyncio.get_running_loop().create_future()

        async def on_msg(msg: Msg) -> None:
            nonlocal count, first, last, cpu_first
            last = time.perf_counter()
            if count == 0:
                first, cpu_first = last, time.process_time()
            count += 1
            if count >= n and not done.done():
                done.set_result(None)

        dropped = 0

        async def on_error(exc: Exception) -> None:
            nonlocal dropped
            if isinstance(exc, nats.errors.SlowConsumerError):
                dropped += 1

        nc._error_cb = on_error  # count slow-consumer drops instead of logging them
        await nc.subscribe(place["subject"], cb=on_msg, pending_msgs_limit=CORE_PENDING_MSGS,
                           pending_bytes_limit=CORE_PENDING_BYTES)
        await nc.flush()
        await ready()
        deadline = time.monotonic() + 300
        seen = -1
        while not done.done() and time.monotonic() < deadline:
            if count == seen and count > 0:
                break  # the feed is over and some never came (dropped)
            seen = count
            await asyncio.wait({done}, timeout=IDLE_END)
        cpu = time.process_time() - cpu_first
        notes = [f"{dropped} dropped by the client (slow consumer)"] if dropped else []
        sample = Sample(count, last - first, cpu, peak_rss(), count, os.getloadavg()[0],
                        notes=notes)
        await nc.close()
        return sample


# ----------------------------------------------------------------------- jetstream


class _PubAcks:
    """PubAcks of pipelined batches, counted per batch by one inbox callback."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self._skip = len(self.inbox) + 1
        self.waiting: dict[str, list[Any]] = {}  # batch id -> [remaining, future]
        self.errors = 0

    async def start(self) -> None:
        await self.nc.subscribe(self.inbox + ".*", cb=self._on_ack, pending_msgs_limit=-1,
                                pending_bytes_limit=-1)

    async def _on_ack(self, msg: Msg) -> None:
        state = self.waiting.get(msg.subject[self._skip:])
        if state is None:
            return
        if b'"error"' in msg.data or (msg.headers and msg.headers.get("Status")):
            self.errors += 1
        state[0] -= 1
        if state[0] == 0:
            state[1].set_result(None)

    async def publish_batch(self, batch_id: str, subject: str, data: bytes | list[bytes],
                            first: int, count: int, id_prefix: str | None) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiting[batch_id] = [count, future]
        reply = f"{self.inbox}.{batch_id}"
        publish = self.nc.publish
        if isinstance(data, list):  # one payload per message
            for seq in range(first, first + count):
                headers = {"Nats-Msg-Id": f"{id_prefix}{seq}"} if id_prefix else None
                await publish(subject, data[seq], reply=reply, headers=headers)
        elif id_prefix is None:
            for _ in range(count):
                await publish(subject, data, reply=reply)
        else:
            for seq in range(first, first + count):
                await publish(subject, data, reply=reply,
                              headers={"Nats-Msg-Id": f"{id_prefix}{seq}"})
        await asyncio.wait_for(future, 30)
        del self.waiting[batch_id]


@endpoint
class JetStream(_NatsBase):
    """A JetStream stream, read through a durable consumer."""

    name = "jetstream"
    durable = True
    gives_ids = True
    uses_ids = True  # Nats-Msg-Id (the sink's dedupe option is on by default)
    ids_label = "with Nats-Msg-Id"
    produce_legs = {"pipelined": "batch published at once on one reply inbox, PubAcks "
                    "counted by a callback, max_in_flight batches outstanding"}
    consume_legs = {
        "pull": "durable pull consumer on one long-lived inbox, requests ahead of need, "
                "+ACK per message",
        "push": "durable push consumer to a callback, +ACK per message",
    }
    feed_technique = "pipelined"

    async def create(self, tag: str, params: Params, role: str) -> Place:
        stream = f"BENCH_{tag}_{role}".upper().replace("-", "_")
        subject = f"bench.{tag}.{role}"
        storage = api.StorageType.MEMORY if params.storage == "memory" else api.StorageType.FILE
        await self.nc.jetstream().add_stream(name=stream, subjects=[subject], storage=storage)
        return {"stream": stream, "subject": subject, "durable": f"bench-{tag}"}

    async def destroy(self, place: Place) -> None:
        with contextlib.suppress(Exception):  # already gone
            await self.nc.jetstream().delete_stream(place["stream"])

    async def delivered(self, place: Place) -> int:
        info = await self.nc.jetstream().stream_info(place["stream"])
        return int(info.state.messages)

    async def backlog(self, place: Place) -> dict[str, int]:
        try:
            info = await self.nc.jetstream().consumer_info(place["stream"], place["durable"])
        except Exception:  # not created yet (natsconn creates it at start)
            return {}
        return {"num_pending": int(info.num_pending or 0),
                "num_ack_pending": int(info.num_ack_pending or 0),
                "num_redelivered": int(info.num_redelivered or 0)}

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "jetstream", "servers": [self.url], "stream": place["stream"],
                "durable": place["durable"], "prefetch": params.prefetch,
                "prefetch_bytes": params.prefetch_bytes}

    def sink_block(self, place: Place, params: Params) -> dict[str, Any]:
        return {"type": "jetstream", "servers": [self.url], "subject": place["subject"]}

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "max_ack_pending": "20000 (plugin default)"}

    @staticmethod
    def window(params: Params) -> int:
        """The pull window the source plugin keeps for this message size: ``prefetch``
        messages at most, about ``prefetch_bytes`` of payload, two batches at least."""
        by_bytes = params.prefetch_bytes // max(params.size, 1)
        return max(min(params.prefetch, by_bytes), 2 * params.batch, 1)

    # ---- raw legs

    async def produce_pipelined(self, place: Place, params: Params) -> Sample:
        nc = await connect(self.env, "bench-js-produce")
        acks = _PubAcks(nc)
        await acks.start()
        subject, data = place["subject"], payloads(params)
        id_prefix = f"{place['stream']}:" if params.ids else None
        slots = asyncio.Semaphore(params.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        watch = Stopwatch()
        sent, batch_no = 0, 0
        while sent < params.count:
            k = min(params.batch, params.count - sent)
            await slots.acquire()
            task = asyncio.create_task(
                acks.publish_batch(str(batch_no), subject, data, sent, k, id_prefix))
            task.add_done_callback(lambda _t: slots.release())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += k
            batch_no += 1
        if tasks:
            await asyncio.gather(*tasks)
        sample = watch.sample(sent, notes=[f"{acks.errors} PubAck errors"] if acks.errors
                              else [])
        await nc.close()
        return sample

    async def _consumer(self, nc: NATS, place: Place, deliver: str | None,
                        max_ack_pending: int = 20_000) -> None:
        config = api.ConsumerConfig(
            durable_name=place["durable"], ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=30, max_ack_pending=max_ack_pending, deliver_subject=deliver,
            max_waiting=None if deliver else 512)
        await nc.jetstream().add_consumer(place["stream"], config)

    async def _acked(self, nc: NATS, place: Place, n: int) -> list[str]:
        """After the window: check the server saw every ack (not timed)."""
        js = nc.jetstream()
        for _ in range(100):
            info = await js.consumer_info(place["stream"], place["durable"])
            if info.num_ack_pending == 0 and info.ack_floor.stream_seq >= n:
                return []
            await asyncio.sleep(0.05)
        return [f"only {info.ack_floor.stream_seq} acked ({info.num_ack_pending} pending)"]

    async def consume_pull(self, place: Place, params: Params, ready: Ready) -> Sample:
        nc = await connect(self.env, "bench-js-pull")
        await self._consumer(nc, place, None)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{place['stream']}.{place['durable']}"
        inbox = nc.new_inbox()
        n, batch, prefetch = params.count, params.batch, self.window(params)
        # each request capped by bytes, as the plugin does (never below one max payload)
        max_bytes = max(params.prefetch_bytes, nc.max_payload + 4096)
        count = 0
        requested = 0
        replies: list[str] = []
        done = asyncio.get_running_loop().create_future()
        publish = nc.publish

        async def pull(k: int) -> None:
            nonlocal requested
            requested += k
            await publish(next_subject, b'{"batch":%d,"expires":5000000000,"max_bytes":%d}'
                          % (k, max_bytes), reply=inbox)

        async def on_msg(msg: Msg) -> None:
            nonlocal count, requested
            status = _status(msg)
            if status is not None:
                if status != "100":
                    pending = (msg.headers or {}).get("Nats-Pending-Messages", "")
                    requested = max(0, requested - int(pending)) if pending.isdigit() else 0
                    if count < n:
                        await pull(prefetch - requested)
                return
            requested -= 1
            count += 1
            replies.append(msg.reply)
            if len(replies) >= batch or count >= n:
                for reply in replies:
                    await publish(reply, b"+ACK")
                replies.clear()
                if count >= n:
                    await nc.flush()
                    done.set_result(None)
                    return
            if requested < prefetch // 2 and count + requested < n:
                await pull(min(prefetch - requested, n - count - requested))

        await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await ready()
        watch = Stopwatch()
        await pull(min(prefetch, n))
        await asyncio.wait_for(done, 300)
        sample = watch.sample(count)
        sample.notes += await self._acked(nc, place, n)
        await nc.close()
        return sample

    async def consume_push(self, place: Place, params: Params, ready: Ready) -> Sample:
        nc = await connect(self.env, "bench-js-push")
        deliver = nc.new_inbox()
        # A push consumer sends up to max_ack_pending messages unasked: bound them by
        # bytes as the pull window is (prefetch_bytes), or large messages overrun the
        # server's per-client pending limit and it cuts the connection (slow consumer);
        # ack at least every half window so the flow never waits for a whole batch.
        unacked = max(min(20_000, params.prefetch_bytes // max(params.size, 1)), 2)
        n, batch = params.count, min(params.batch, unacked // 2)
        count = 0
        replies: list[str] = []
        done = asyncio.get_running_loop().create_future()
        publish = nc.publish

        async def on_msg(msg: Msg) -> None:
            nonlocal count
            if _status(msg) is not None:
                return
            count += 1
            replies.append(msg.reply)
            if len(replies) >= batch or count >= n:
                for reply in replies:
                    await publish(reply, b"+ACK")
                replies.clear()
                if count >= n and not done.done():
                    await nc.flush()
                    done.set_result(None)

        await nc.subscribe(deliver, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await ready()
        watch = Stopwatch()
        await self._consumer(nc, place, deliver, unacked)
        await asyncio.wait_for(done, 300)
        sample = watch.sample(count)
        sample.notes += await self._acked(nc, place, n)
        await nc.close()
        return sample


pair(Pair("jetstream", "nats"))
pair(Pair("nats", "jetstream"))
pair(Pair("jetstream", "jetstream"))
