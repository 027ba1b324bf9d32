"""The NATS KV and Object Store plugins against the conformance kit, on the real
nats-server (``scripts/services start nats``).

Every test gets its own bucket, deleted afterwards. The kit has suites for
sources and sinks only; the claim-check transforms get the same treatment by
hand at the end (awkward payloads round trip, a cut connection heals, poison
is rejected with a reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from natsconn_nats.claim_check import CLAIM, ClaimCheckGet, ClaimCheckPut
from natsconn_nats.kv_sink import KvSink
from natsconn_nats.kv_source import KvSource
from natsconn_nats.object_store import ObjectSink

from connector import Message, Rejected, RetryableError
from connector.testing.kit import SinkSuite, SourceSuite
from connector.testing.proxy import TcpProxy
from connector.testing.servers import host_port

MAX_PAYLOAD = 8 * 1024 * 1024  # scripts/services' nats-server
ACK_WAIT = 2.0
MAX_ACK_PENDING = 20

Produce = Callable[[list[Message]], Awaitable[None]]
Fetch = Callable[[int, float], Awaitable[list[Message]]]


@pytest.fixture
def server_address(nats_url: str) -> str:
    host, port = host_port("nats", nats_url)
    return f"{host}:{port}"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url, name="natsconn-conformance-kv")
    yield client
    await client.close()


@pytest.fixture
async def bucket(nc: NATS, unique: str) -> AsyncIterator[str]:
    """A fresh KV bucket keeping 64 revisions per key."""
    name = f"conf_kv_{unique}"
    await nc.jetstream().create_key_value(bucket=name, history=64)
    yield name
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_key_value(name)


@pytest.fixture
async def object_bucket(nc: NATS, unique: str) -> AsyncIterator[str]:
    name = f"conf_obj_{unique}"
    await nc.jetstream().create_object_store(name)
    yield name
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_object_store(name)


def _servers(address: str) -> list[str]:
    return [f"nats://{address}"]


async def _read_stream(nc: NATS, stream: str, subjects: str, count: int,
                       timeout: float) -> list[Message]:
    """Up to ``count`` messages of ``stream`` from the start (ordered consumer)."""
    js = nc.jetstream()
    sub = await js.subscribe(subjects, stream=stream, ordered_consumer=True)
    out: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while len(out) < count:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            out.append(Message(msg.data, msg.subject, None, msg.headers or {}))
    finally:
        await sub.unsubscribe()
    return out


# ---------------------------------------------------------------------- nats_kv


class TestKvSource(SourceSuite):
    """Puts (with headers) on distinct keys; the source's durable reads them."""

    redelivery_wait = 5.0  # ack_wait is 2 s
    keeps_order = True
    saturates_at = MAX_ACK_PENDING

    @pytest.fixture
    def make_source(self, server_address: str, bucket: str, unique: str
                    ) -> Callable[[str | None], KvSource]:
        def make(address: str | None = None) -> KvSource:
            return KvSource.make_test_instance(
                servers=_servers(address or server_address), bucket=bucket,
                durable=f"conf-{unique}", ack_wait=ACK_WAIT, max_ack_pending=MAX_ACK_PENDING)
        return make

    @pytest.fixture
    def produce(self, nc: NATS, bucket: str) -> Produce:
        js = nc.jetstream()
        keys = itertools.count()

        async def produce(messages: list[Message]) -> None:
            for m in messages:
                await js.publish(f"$KV.{bucket}.k.{next(keys)}", m.data,
                                 headers=dict(m.headers) or None)
        return produce


class TestKvSink(SinkSuite):
    """Every message to one key (``{subject}``); the bucket keeps 64 revisions, so
    the stream holds each write and the fetch reads it back in order."""

    keeps_headers = False  # a KV entry is a value; headers are not stored
    keeps_order = True
    dedupes_by_id = True  # Nats-Msg-Id from Message.id
    max_message_bytes = MAX_PAYLOAD
    message_subject = "conformance.key"

    @pytest.fixture
    def make_sink(self, server_address: str, bucket: str) -> Callable[[str | None], KvSink]:
        def make(address: str | None = None) -> KvSink:
            return KvSink.make_test_instance(
                servers=_servers(address or server_address), bucket=bucket, key="{subject}",
                ack_timeout=5.0)
        return make

    @pytest.fixture
    def fetch(self, nc: NATS, bucket: str) -> Fetch:
        async def fetch(count: int, timeout: float) -> list[Message]:
            return await _read_stream(nc, f"KV_{bucket}", f"$KV.{bucket}.>", count, timeout)
        return fetch


# ---------------------------------------------------------------------- nats_object


class TestObjectSink(SinkSuite):
    keeps_headers = True  # stored in the object's meta
    dedupes_by_id = True  # the object's name is the message id: a rewrite overwrites

    @pytest.fixture
    def make_sink(self, server_address: str, object_bucket: str
                  ) -> Callable[[str | None], ObjectSink]:
        def make(address: str | None = None) -> ObjectSink:
            return ObjectSink.make_test_instance(
                servers=_servers(address or server_address), bucket=object_bucket,
                timeout=5.0)
        return make

    @pytest.fixture
    def fetch(self, nc: NATS, object_bucket: str) -> Fetch:
        async def fetch(count: int, timeout: float) -> list[Message]:
            store = await nc.jetstream().object_store(object_bucket)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    infos = await store.list(ignore_deletes=True)
                except NotFoundError:
                    infos = []
                if len(infos) >= count or loop.time() >= deadline:
                    break
                await asyncio.sleep(0.2)
            out = []
            for info in infos:
                result = await store.get(info.name)
                headers = {k: v[0] if isinstance(v, list) else v
                           for k, v in (info.headers or {}).items()}
                out.append(Message(result.data or b"", info.name, None, headers))
            return out
        return fetch


# ---------------------------------------------------------------------- claim check


def _payloads() -> list[bytes]:
    """Awkward payloads on both sides of a 1 KiB threshold."""
    return [b"", b"\x00" * 1024, b"\x00" * 1025, b"\xff\xfe\r\nPUB x 1\r\n" * 200,
            os.urandom(3 * MAX_PAYLOAD // 2), "Grüße ✓ 東京".encode() * 100]


async def _pair(address: str, bucket: str) -> tuple[ClaimCheckPut, ClaimCheckGet]:
    put = ClaimCheckPut.make_test_instance(servers=_servers(address), bucket=bucket,
                                           threshold=1024, timeout=20.0)
    get = ClaimCheckGet.make_test_instance(servers=_servers(address), bucket=bucket,
                                           timeout=20.0)
    await put.connect()
    await get.connect()
    return put, get


async def test_claim_check_round_trip(server_address: str, object_bucket: str) -> None:
    """Larger than the threshold (and than max_payload) out and back byte-exact, headers
    and key and id kept; at or under it untouched."""
    put, get = await _pair(server_address, object_bucket)
    try:
        sent = [Message(data, "conf.cc", b"key-%d" % i, {"X-Index": str(i)}, 1.0, f"cc:{i}")
                for i, data in enumerate(_payloads())]
        parked = await put.process(list(sent))
        assert all(isinstance(m, Message) for m in parked)
        for m, original in zip(parked, sent, strict=True):
            assert isinstance(m, Message)
            if len(original.data) > 1024:
                assert m.data == b"" and m.headers[CLAIM] == f"{object_bucket}/{original.id}"
            else:
                assert m == original
        back = await get.process([m for m in parked if isinstance(m, Message)])
        assert back == sent
    finally:
        await put.close()
        await get.close()


async def test_claim_check_rejects_what_it_cannot_restore(
        server_address: str, object_bucket: str, nc: NATS) -> None:
    put, get = await _pair(server_address, object_bucket)
    try:
        parked = await put.process([Message(b"x" * 5000, "s", None, {}, None, "one")])
        m = parked[0]
        assert isinstance(m, Message)
        missing = m.with_headers({CLAIM: f"{object_bucket}/nope"})
        other = m.with_headers({CLAIM: "some_other_bucket/one"})
        wrong = m.with_headers({"Natsconn-Claim-Check-Digest": "SHA-256=AAAA"})
        out = await get.process([missing, other, wrong, m])
        reasons = [o.reason for o in out if isinstance(o, Rejected)]
        assert len(reasons) == 3, out
        assert "'nope' not found" in reasons[0]
        assert "only" in reasons[1] and object_bucket in reasons[1]
        assert "digest" in reasons[2]
        assert isinstance(out[3], Message) and out[3].data == b"x" * 5000
    finally:
        await put.close()
        await get.close()


async def test_claim_check_heals_after_a_cut(
        server_address: str, object_bucket: str,
        tcp_proxy: Callable[..., Awaitable[TcpProxy]]) -> None:
    host, _, port = server_address.rpartition(":")
    proxy = await tcp_proxy(host, int(port))
    put, get = await _pair(proxy.address, object_bucket)
    try:
        first = await put.process([Message(b"a" * 4096, None, None, {}, None, "a")])
        proxy.cut()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:  # as the engine would: a failed batch is tried again
            try:
                second = await put.process([Message(b"b" * 4096, None, None, {}, None, "b")])
                break
            except RetryableError:
                assert loop.time() < deadline, "claim_check_put did not heal"
                await asyncio.sleep(0.5)
        back = await get.process([m for m in [*first, *second] if isinstance(m, Message)])
        assert [m.data for m in back if isinstance(m, Message)] == [b"a" * 4096, b"b" * 4096]
        assert proxy.accepted >= 2
    finally:
        await put.close()
        await get.close()
