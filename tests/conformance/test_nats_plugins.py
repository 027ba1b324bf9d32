"""The four NATS plugins against the conformance kit, on the real nats-server
(``scripts/services start nats``).

Every test gets its own subjects ``conf.<unique>.>`` and, for JetStream, its
own stream and durable, deleted afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from natsconn_nats.jetstream_sink import JetStreamSink
from natsconn_nats.jetstream_source import JetStreamSource
from natsconn_nats.sink import NatsSink
from natsconn_nats.source import NatsSource

from connector import NO_ACK, Batch, Message
from connector.testing.kit import SinkSuite, SourceSuite
from connector.testing.servers import host_port

# scripts/services configures nats-server with max_payload 8MB (MiB).
MAX_PAYLOAD = 8 * 1024 * 1024
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
    """A plain client straight to the server (never through the test proxy)."""
    client = await nats.connect(nats_url, name="natsconn-conformance")
    yield client
    await client.close()


@pytest.fixture
async def stream(nc: NATS, unique: str) -> AsyncIterator[str]:
    """A fresh stream capturing ``conf.<unique>.>``."""
    js = nc.jetstream()
    name = f"CONF_{unique}"
    await js.add_stream(name=name, subjects=[f"conf.{unique}.>"])
    yield name
    await js.delete_stream(name)


def _servers(address: str) -> list[str]:
    return [f"nats://{address}"]


def _message(msg: Msg) -> Message:
    return Message(msg.data, msg.subject, None, msg.headers or {})


S = TypeVar("S", bound=JetStreamSource)


def jetstream_sources(
    cls: type[S], server_address: str, stream: str, unique: str
) -> Callable[[str | None], S]:
    """make_source for the stream: one durable per test, short ack wait."""
    def make(address: str | None = None) -> S:
        return cls.make_test_instance(
            servers=_servers(address or server_address), stream=stream,
            durable=f"conf-{unique}", ack_wait=ACK_WAIT, max_ack_pending=MAX_ACK_PENDING)
    return make


def jetstream_producer(nc: NATS, stream: str, unique: str) -> Produce:
    """produce for the stream: JetStream publishes, each acknowledged."""
    js = nc.jetstream()

    async def produce(messages: list[Message]) -> None:
        for m in messages:
            await js.publish(f"conf.{unique}.in", m.data, stream=stream,
                             headers=dict(m.headers) or None)
    return produce


# ---------------------------------------------------------------------- sources


class TestJetStreamSource(SourceSuite):
    redelivery_wait = 5.0  # ack_wait is 2 s
    keeps_order = True
    saturates_at = MAX_ACK_PENDING

    @pytest.fixture
    def make_source(
        self, server_address: str, stream: str, unique: str
    ) -> Callable[[str | None], JetStreamSource]:
        return jetstream_sources(JetStreamSource, server_address, stream, unique)

    @pytest.fixture
    def produce(self, nc: NATS, stream: str, unique: str) -> Produce:
        return jetstream_producer(nc, stream, unique)


class TestNatsSource(SourceSuite):
    at_least_once = False
    keeps_order = True

    @pytest.fixture
    def make_source(
        self, server_address: str, unique: str
    ) -> Callable[[str | None], NatsSource]:
        def make(address: str | None = None) -> NatsSource:
            return NatsSource.make_test_instance(
                servers=_servers(address or server_address), subjects=[f"conf.{unique}.>"])
        return make

    @pytest.fixture
    def produce(self, nc: NATS, unique: str) -> Produce:
        async def produce(messages: list[Message]) -> None:
            for m in messages:
                await nc.publish(f"conf.{unique}.in", m.data, headers=dict(m.headers) or None)
            await nc.flush()
        return produce


# ---------------------------------------------------------------------- sinks


class TestJetStreamSink(SinkSuite):
    keeps_order = True
    dedupes_by_id = True  # Nats-Msg-Id from Message.id
    max_message_bytes = MAX_PAYLOAD

    @pytest.fixture
    def make_sink(
        self, server_address: str, stream: str, unique: str
    ) -> Callable[[str | None], JetStreamSink]:
        def make(address: str | None = None) -> JetStreamSink:
            return JetStreamSink.make_test_instance(
                servers=_servers(address or server_address), subject=f"conf.{unique}.out",
                ack_timeout=5.0)
        return make

    @pytest.fixture
    def fetch(self, nc: NATS, stream: str, unique: str) -> Fetch:
        """Everything in the stream, read with an ordered (ephemeral) consumer."""
        js = nc.jetstream()

        async def fetch(count: int, timeout: float) -> list[Message]:
            sub = await js.subscribe(f"conf.{unique}.>", stream=stream, ordered_consumer=True)
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
                    out.append(_message(msg))
            finally:
                await sub.unsubscribe()
            return out
        return fetch


class TestNatsSink(SinkSuite):
    keeps_order = True
    max_message_bytes = MAX_PAYLOAD

    @pytest.fixture
    def make_sink(
        self, server_address: str, unique: str
    ) -> Callable[[str | None], NatsSink]:
        def make(address: str | None = None) -> NatsSink:
            return NatsSink.make_test_instance(
                servers=_servers(address or server_address), subject=f"conf.{unique}.out")
        return make

    @pytest.fixture
    async def fetch(self, nc: NATS, unique: str) -> Fetch:
        """Core NATS keeps nothing: subscribe when the fixture is set up, which is
        before the test writes anything, and hand out what arrived."""
        received: list[Message] = []
        arrived = asyncio.Event()

        async def on_message(msg: Msg) -> None:
            received.append(_message(msg))
            arrived.set()

        await nc.subscribe(f"conf.{unique}.out", cb=on_message, pending_msgs_limit=-1,
                           pending_bytes_limit=-1)
        # Twice: nats-py sends the first PING ahead of the queued SUB.
        await nc.flush()
        await nc.flush()

        async def fetch(count: int, timeout: float) -> list[Message]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while len(received) < count:
                left = deadline - loop.time()
                if left <= 0:
                    break
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), left)
                except TimeoutError:
                    break
            return list(received)
        return fetch


# ---------------------------------------------------------------------- the kit itself
# Broken variants of the JetStream source, run through suite tests directly:
# each must fail, with a message that says what is wrong (and a hang in time).


class _HangingSource(JetStreamSource):
    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        await asyncio.Event().wait()  # never returns
        return None


class _LossySource(JetStreamSource):
    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        batch = await super().read_batch(max_messages, max_wait)
        if batch is not None:
            await batch.ack.ack()
            batch = Batch(batch.messages[1:], batch.ack)  # the first of each batch is lost
        return batch


class _IgnoresAckSource(JetStreamSource):
    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        batch = await super().read_batch(max_messages, max_wait)
        if batch is not None:
            batch = Batch(batch.messages, NO_ACK)
        return batch


class _QuickSuite(SourceSuite):
    test_timeout = 4.0


class _ShortReads(SourceSuite):
    read_timeout = 3.0


async def test_kit_fails_a_source_that_hangs(
    server_address: str, stream: str, unique: str, nc: NATS
) -> None:
    suite = _QuickSuite()
    make = jetstream_sources(_HangingSource, server_address, stream, unique)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AssertionError, match="did not finish within 4s"):
        await suite.test_round_trip(make, jetstream_producer(nc, stream, unique))
    assert loop.time() - started < 4.0 + _QuickSuite.close_timeout


async def test_kit_fails_a_source_that_loses_messages(
    server_address: str, stream: str, unique: str, nc: NATS
) -> None:
    make = jetstream_sources(_LossySource, server_address, stream, unique)
    with pytest.raises(AssertionError, match=r"sent 50, got \d+: missing"):
        await _ShortReads().test_round_trip(make, jetstream_producer(nc, stream, unique))


async def test_kit_fails_a_source_whose_ack_does_nothing(
    server_address: str, stream: str, unique: str, nc: NATS
) -> None:
    make = jetstream_sources(_IgnoresAckSource, server_address, stream, unique)
    # The JetStream source keeps batches it handed out alive (+WPI) until they are
    # settled, so the ignored acks show when a second instance gets them all again.
    with pytest.raises(AssertionError,
                       match=r"redelivered within redelivery_wait|unexpected or duplicated 20"):
        await SourceSuite().test_ack_prevents_redelivery(
            make, jetstream_producer(nc, stream, unique))


class _SilentSink(NatsSink):
    async def write_batch(self, messages: Sequence[Message]) -> None:
        return None  # claims success, writes nothing


async def test_kit_fails_a_sink_that_writes_nothing(
    server_address: str, unique: str, nc: NATS
) -> None:
    suite = SinkSuite()
    suite.fetch_timeout = 1.0  # type: ignore[misc]
    got: list[Message] = []

    def make(address: str | None = None) -> NatsSink:
        return _SilentSink.make_test_instance(
            servers=_servers(address or server_address), subject=f"conf.{unique}.out")

    async def fetch(count: int, timeout: float) -> list[Message]:
        await asyncio.sleep(timeout)
        return got

    with pytest.raises(AssertionError, match="sent 50, got 0"):
        await suite.test_round_trip(make, fetch)
