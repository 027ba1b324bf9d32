"""The natsconn conformance kit: reusable pytest suites for source and sink plugins.

A plugin package proves its plugins behave the way the engine relies on by
subclassing two classes and providing three fixtures each. The suites run
against real servers (never mocks) and put a TCP proxy between the plugin and
its server to cut the connection.

Requirements
============
* ``natsconn`` installed (its ``pytest11`` entry point loads
  :mod:`connector.testing.pytest_plugin`, which provides ``tcp_proxy``,
  ``unique`` and the server address fixtures), ``pytest`` and
  ``pytest-asyncio``.
* **``asyncio_mode = "auto"``** in the package's pytest configuration
  (``[tool.pytest.ini_options]`` in pyproject.toml). The suites' tests are
  ``async def`` methods and your fixtures may be ``async def`` too; auto mode
  is what runs both without per-fixture decorations. (The suites also carry
  the ``asyncio`` mark, but strict mode would still need every async fixture
  of yours declared with ``@pytest_asyncio.fixture``.)
* Each test must see a fresh far side: a new stream, topic, key, table or
  subject per test (use the ``unique`` fixture), so that counts are exact.

Sources
=======
::

    import pytest
    from connector import Message
    from connector.testing.kit import SourceSuite
    from my_package.source import MySource

    class TestMySource(SourceSuite):
        redelivery_wait = 5.0      # capabilities: see below
        keeps_key = True

        @pytest.fixture
        def server_address(self, kafka_bootstrap: str) -> str:
            return kafka_bootstrap             # "host:port" of the real server

        @pytest.fixture
        def make_source(self, server_address: str, unique: str):
            def make(address: str | None = None) -> MySource:
                # fresh, unconnected, reading the same place (same group) every call
                return MySource.make_test_instance(
                    bootstrap=address or server_address, topic=f"t-{unique}",
                    group=f"g-{unique}", ack_wait="2s")
            return make

        @pytest.fixture
        async def produce(self, server_address: str, unique: str):
            client = await connect_raw_client(server_address)
            async def produce(messages: list[Message]) -> None:
                ...                     # put each message where the source reads
            yield produce
            await client.close()

``make_source(address)`` may also be ``async``. ``address`` is ``"host:port"``
of a TCP proxy to use instead of the server (the reconnect test). The kit
calls ``produce`` only while an instance made by ``make_source`` is connected,
with messages whose ``subject`` is ``None`` (the fixture decides where they
go), ``headers`` only when ``keeps_headers`` and ``key`` only when
``keeps_key``.

Source capabilities (class attributes):

``at_least_once`` (True)
    The source acknowledges (``ack``/``nack``) and the far side keeps unacked
    messages. False for core NATS, pub/sub, LISTEN: only open/close, empty
    read, round trip and reconnect run; the others are skipped with a reason.
``redelivery_wait`` (5.0)
    Seconds within which a nacked or unacknowledged message must come back,
    and during which an acknowledged one must not. Configure the plugin's ack
    wait / min idle time well below it in ``make_source``.
``keeps_headers`` (True), ``keeps_key`` (False)
    Whether headers / keys put by ``produce`` come back from the source.
``keeps_order`` (False)
    Whether the source delivers in the order produced (one stream/partition).
``sets_subject`` (True)
    Whether each message carries the address it was read from in ``subject``.
``gives_ids`` (None: same as ``at_least_once``)
    Whether each message has a stable ``id``, the same on redelivery.
``batch_size`` (50), ``saturate_count`` (200)
    Messages in the round trip, and in the saturation test. For that test to
    saturate anything, limit the plugin's unacknowledged window (JetStream
    ``max_ack_pending``, …) below ``saturate_count`` in ``make_source``.
``saturates_at`` (None)
    That window, if the source has one: the saturation test then also checks
    that no more than this many messages were handed out unacknowledged.

Sinks
=====
::

    class TestMySink(SinkSuite):
        max_message_bytes = 1_000_000

        @pytest.fixture
        def make_sink(self, server_address, unique): ...   # (address=None) -> Sink
        @pytest.fixture
        async def fetch(self, server_address, unique): ... # (count, timeout) -> list[Message]
        @pytest.fixture
        def server_address(self, ...) -> str: ...

``make_sink`` must configure a fixed, per-test target (topic, stream subject,
key, table): the kit's messages carry ``subject = message_subject`` (None by
default), a unique ``id``, a ``key`` and headers. ``fetch(count, timeout)``
returns what the sink wrote at the far side during the test: as soon as
``count`` messages are there, or whatever is there when ``timeout`` seconds
have passed; in the order of the far side. The kit calls it after all writes,
once per test, except that the reconnect test may call it a second time with a
larger count; each call should return everything written so far (a fresh
consumer from the start, a SELECT, a list that a subscription fills). For a
far side that keeps nothing (core NATS, pub/sub), set the fixture up so that
it listens from before the test's first write (subscribe in the fixture).

Sink capabilities: ``keeps_headers`` (True), ``keeps_key`` (False),
``keeps_order`` (False), ``max_message_bytes`` (None; a message of one byte
more must be refused with ``RejectedError`` alone, or ``PartialWriteError``
naming its index in a mixed batch, whose other messages are written),
``dedupes_by_id`` (False; True: writing the same batch twice leaves one copy
of each message), ``message_subject`` (None), ``batch_size`` (50).

Time limits
===========
Every test is bounded (``test_timeout``, default 90 s) and every single call
(``connect``, ``read_batch``, ``write_batch``, ``close``) has its own bound, so
a hanging plugin fails the test with the name of the call that hung instead
of hanging the run. Messages produced must be read within ``read_timeout``
(30 s); sink writes must return within ``write_timeout`` (30 s), fetches
within ``fetch_timeout`` (20 s); ``read_batch`` may overrun its ``max_wait``
by at most ``READ_GRACE`` (10 s). A cut connection must heal within
``reconnect_timeout`` (20 s) without closing and reopening the plugin.

Helpers for your own tests: :func:`collect` and :func:`collect_batches`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import pytest

from connector import (
    Batch,
    Message,
    PartialWriteError,
    RejectedError,
    RetryableError,
    Sink,
    Source,
)

from .proxy import TcpProxy

__all__ = ["SinkSuite", "SourceSuite", "collect", "collect_batches"]

T = TypeVar("T")

MakeSource = Callable[..., Source[Any] | Awaitable[Source[Any]]]
MakeSink = Callable[..., Sink[Any] | Awaitable[Sink[Any]]]
Produce = Callable[[list[Message]], Awaitable[None]]
Fetch = Callable[[int, float], Awaitable[list[Message]]]
ProxyFactory = Callable[..., Awaitable[TcpProxy]]

# A single read_batch may take this much longer than its max_wait.
READ_GRACE = 10.0
# A clock far off is a unit bug (milliseconds for seconds), not a slow test.
_CLOCK_SLACK = 24 * 3600.0


# ---------------------------------------------------------------------- helpers


async def _bounded(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """Await with a time limit; a hang becomes an AssertionError naming ``what``."""
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"{what} did not return within {seconds:g}s") from None


async def _maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


async def _read_once(
    source: Source[Any], max_messages: int, max_wait: float, read_grace: float = READ_GRACE
) -> Batch | None:
    """One bounded read_batch; None for nothing, for an empty batch (acknowledged)
    and for a RetryableError (after a short pause, as the engine would)."""
    try:
        batch = await _bounded(source.read_batch(max_messages, max_wait), max_wait + read_grace,
                               f"read_batch({max_messages}, max_wait={max_wait:.2f})")
    except RetryableError:
        await asyncio.sleep(min(0.2, max_wait))
        return None
    if batch is None:
        return None
    assert isinstance(batch, Batch), f"read_batch returned a {type(batch).__name__}"
    assert len(batch.messages) <= max_messages, (
        f"read_batch(max_messages={max_messages}) returned {len(batch.messages)} messages")
    if not batch.messages:
        await _bounded(batch.ack.ack(), 10, "ack() of an empty batch")
        return None
    return batch


async def _read(
    source: Source[Any], n: int, timeout: float, max_messages: int, ack: bool,
    read_grace: float = READ_GRACE,
) -> list[Batch]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    batches: list[Batch] = []
    got = 0
    while got < n:
        left = deadline - loop.time()
        if left <= 0:
            break
        batch = await _read_once(source, min(max_messages, n - got), min(left, 1.0), read_grace)
        if batch is None:
            continue
        if ack:
            await _bounded(batch.ack.ack(), 10, "ack()")
        batches.append(batch)
        got += len(batch.messages)
    return batches


async def collect_batches(
    source: Source[Any],
    n: int,
    timeout: float = 10.0,
    *,
    max_messages: int = 100,
    read_grace: float = READ_GRACE,
) -> list[Batch]:
    """Read batches until they hold ``n`` messages or ``timeout`` seconds passed.

    Nothing is acknowledged. ``RetryableError`` from ``read_batch`` is retried
    after a short pause, as the engine would. Never asks for more than ``n``
    messages in total; a source returning more than it was asked for fails,
    and so does a ``read_batch`` that overruns its ``max_wait`` by more than
    ``read_grace`` seconds.
    """
    return await _read(source, n, timeout, max_messages, False, read_grace)


async def collect(
    source: Source[Any],
    n: int,
    timeout: float = 10.0,
    *,
    ack: bool = True,
    max_messages: int = 100,
) -> list[Message]:
    """Read until ``n`` messages arrived or ``timeout`` seconds passed; return them.

    Each batch is acknowledged as soon as it is read, unless ``ack=False``.
    """
    batches = await _read(source, n, timeout, max_messages, ack)
    return [m for b in batches for m in b.messages]


async def _drain(source: Source[Any], seconds: float, *, ack: bool = True) -> list[Message]:
    """Everything the source delivers during ``seconds`` (acknowledged)."""
    return await collect(source, 1_000_000, seconds, ack=ack)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise AssertionError(f"server_address must be 'host:port', got {address!r}")
    return host.strip("[]"), int(port)


def _payloads(n: int, tag: str, *, empty: bool = True) -> list[bytes]:
    """``n`` distinct payloads, the awkward ones first: empty, non-UTF-8, bytes
    that look like protocol framing, multi-byte UTF-8, NULs, a larger one.

    All but the empty one contain ``tag``; a test that sends two sets and tells
    them apart by payload gives ``empty=False`` for the second."""
    special = [
        b"" if empty else b"\x01" + tag.encode(),
        b"\xff\xfe\xfd\x80\x00 not utf-8 " + tag.encode(),
        b"line\r\nPUB x 1\r\n\r\n+OK\r\n" + tag.encode(),
        f"Grüße, 世界 ✓ {tag}".encode(),
        b"\x00" * 7 + tag.encode() + b"\x00",
        (tag.encode() + b"=") * (16 * 1024 // (len(tag) + 1)),
    ]
    out = special[:n]
    for i in range(len(out), n):
        out.append(b"\xc3\x28" + f"{tag}:{i:05d}".encode() + bytes([i % 256]))
    return out


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _header_of(message: Message, name: str) -> str | None:
    """A header by name, compared case-insensitively (far sides differ)."""
    value = message.headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in message.headers.items():
        if key.lower() == lowered:
            return val
    return None


def _check_headers(expected: Message, got: Message) -> None:
    for name, value in expected.headers.items():
        actual = _header_of(got, name)
        assert actual == value, (
            f"header {name!r}: sent {value!r}, got {actual!r} "
            f"(all headers received: {dict(got.headers)!r})")


def _by_data(messages: Iterable[Message]) -> dict[bytes, Message]:
    return {m.data: m for m in messages}


def _short(data: bytes) -> str:
    return repr(data if len(data) <= 40 else data[:40] + b"...")


def _check_exact(sent: Sequence[Message], got: Sequence[Message]) -> None:
    """``got`` holds each sent payload exactly once and nothing else."""
    want = Counter(m.data for m in sent)
    have = Counter(m.data for m in got)
    missing = want - have
    extra = have - want
    assert not missing and not extra, (
        f"sent {len(sent)}, got {len(got)}: missing {len(missing)} "
        f"{[_short(d) for d in list(missing)[:5]]}, unexpected or duplicated {len(extra)} "
        f"{[_short(d) for d in list(extra)[:5]]}")


def _check_covers(sent: Sequence[Message], got: Sequence[Message]) -> None:
    """Each sent payload at least once in ``got``, nothing foreign."""
    sent_data = {m.data for m in sent}
    have = {m.data for m in got}
    missing = sent_data - have
    assert not missing, (f"{len(missing)} of {len(sent)} messages never arrived, e.g. "
                         f"{[_short(d) for d in list(missing)[:5]]}")
    foreign = have - sent_data
    assert not foreign, f"messages that were never sent arrived: {list(foreign)[:5]!r}"


class _Live:
    """The plugin instances a test opened; whatever is still open at the end is
    closed (bounded, errors ignored) so that a failing test leaks nothing."""

    def __init__(self, connect_timeout: float, close_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self._open: list[Source[Any] | Sink[Any]] = []

    async def build(self, make: Callable[..., Any], address: str | None = None) -> Any:
        plugin = await _maybe_await(make() if address is None else make(address))
        assert isinstance(plugin, Source | Sink), (
            f"the factory returned {type(plugin).__name__}, not a Source or Sink")
        self._open.append(plugin)
        return plugin

    async def open(self, make: Callable[..., Any], address: str | None = None) -> Any:
        plugin = await self.build(make, address)
        await _bounded(plugin.connect(), self.connect_timeout, f"{type(plugin).__name__}"
                       ".connect()")
        return plugin

    async def close(self, plugin: Source[Any] | Sink[Any]) -> None:
        await _bounded(plugin.close(), self.close_timeout, f"{type(plugin).__name__}.close()")
        with contextlib.suppress(ValueError):
            self._open.remove(plugin)

    async def aclose(self) -> None:
        for plugin in reversed(self._open):
            with contextlib.suppress(Exception):
                await _bounded(plugin.close(), self.close_timeout, "close()")
        self._open.clear()


class _Suite:
    """What both suites share: time limits and per-test bookkeeping."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    keeps_headers: ClassVar[bool] = True
    keeps_key: ClassVar[bool] = False
    keeps_order: ClassVar[bool] = False
    batch_size: ClassVar[int] = 50

    test_timeout: ClassVar[float] = 90.0
    connect_timeout: ClassVar[float] = 20.0
    close_timeout: ClassVar[float] = 15.0
    reconnect_timeout: ClassVar[float] = 20.0

    @contextlib.asynccontextmanager
    async def _test(self, seconds: float | None = None) -> AsyncIterator[_Live]:
        """The body of one suite test: a deadline, and cleanup of what it opened."""
        limit = self.test_timeout if seconds is None else seconds
        live = _Live(self.connect_timeout, self.close_timeout)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                yield live
        except TimeoutError:
            if deadline.expired():
                raise AssertionError(
                    f"the test did not finish within {limit:g}s (test_timeout): a plugin "
                    "call or fixture hangs") from None
            raise
        finally:
            await live.aclose()


# ---------------------------------------------------------------------- sources


_NEEDS_ACKS = frozenset({
    "test_ack_prevents_redelivery", "test_nack_redelivers", "test_unacked_survive_close",
    "test_saturated_source_resumes",
})


class SourceSuite(_Suite):
    """Conformance tests for a Source plugin; see the module docstring."""

    at_least_once: ClassVar[bool] = True
    redelivery_wait: ClassVar[float] = 5.0
    sets_subject: ClassVar[bool] = True
    gives_ids: ClassVar[bool | None] = None
    saturate_count: ClassVar[int] = 200
    saturation_quiet: ClassVar[float] = 1.0
    saturates_at: ClassVar[int | None] = None
    read_timeout: ClassVar[float] = 30.0  # for messages known to be there

    @classmethod
    def applies(cls, test_name: str) -> bool:
        """Whether a suite test applies to this plugin's capabilities. Tests that do
        not apply are deselected at collection by natsconn's pytest plugin (and
        skipped with the reason if it is not loaded)."""
        if test_name in _NEEDS_ACKS:
            return cls.at_least_once
        return True

    # -- building blocks

    def _ids_expected(self) -> bool:
        return self.at_least_once if self.gives_ids is None else self.gives_ids

    def _need_acks(self) -> None:
        if not self.at_least_once:
            pytest.skip(f"{type(self).__name__}.at_least_once is False: the far side keeps "
                        "no unacknowledged messages to redeliver")

    def _messages(self, n: int, tag: str | None = None, *, empty: bool = True
                  ) -> list[Message]:
        tag = f"{tag or ''}{_tag()}"
        out = []
        for i, data in enumerate(_payloads(n, tag, empty=empty)):
            headers = {"X-Conformance-Index": str(i), "X-Conformance-Tag": f"{tag} {i};x=y"} \
                if self.keeps_headers else {}
            key = f"key-{tag}-{i}".encode() if self.keeps_key else None
            out.append(Message(data, None, key, headers))
        return out

    def _check_delivered(self, sent: Sequence[Message], got: Sequence[Message]) -> None:
        """Per-message facts: headers, key, subject, id, timestamp."""
        by_data = _by_data(sent)
        now = time.time()
        for m in got:
            assert isinstance(m, Message), f"read_batch returned a {type(m).__name__}"
            assert isinstance(m.data, bytes), f"data is {type(m.data).__name__}, not bytes"
            want = by_data.get(m.data)
            if want is None:
                continue
            if self.keeps_headers:
                _check_headers(want, m)
            if self.keeps_key:
                assert m.key == want.key, f"key: sent {want.key!r}, got {m.key!r}"
            if self.sets_subject:
                assert isinstance(m.subject, str) and m.subject, (
                    f"message without subject ({m.subject!r}); set sets_subject = False if "
                    "the source cannot tell where a message came from")
            if self._ids_expected():
                assert isinstance(m.id, str) and m.id, f"message without id ({m.id!r})"
            if m.timestamp is not None:
                assert abs(m.timestamp - now) < _CLOCK_SLACK, (
                    f"timestamp {m.timestamp} is not seconds since the epoch (now {now:.0f})")
        if self._ids_expected():
            ids = Counter(m.id for m in got)
            first = {m.data: m.id for m in reversed(got)}
            for m in got:
                assert m.id == first[m.data], (
                    f"redelivered message {_short(m.data)} changed id {first[m.data]!r} -> "
                    f"{m.id!r}")
            distinct = {m.data for m in got}
            assert len(ids) == len(distinct), (
                f"{len(distinct)} distinct messages carry {len(ids)} distinct ids")

    def _check_order(self, sent: Sequence[Message], got: Sequence[Message]) -> None:
        if self.keeps_order:
            assert [m.data for m in got] == [m.data for m in sent], \
                "messages arrived out of the order produced (keeps_order = True)"

    async def _read_exactly(self, source: Source[Any], sent: Sequence[Message],
                            timeout: float) -> list[Message]:
        got = await collect(source, len(sent), timeout, max_messages=20)
        _check_exact(sent, got)
        self._check_delivered(sent, got)
        return got

    # -- the tests

    async def test_open_close(self, make_source: MakeSource, produce: Produce) -> None:
        """close() without connect(), close() twice, a second open; then it still works."""
        async with self._test() as live:
            never = await live.build(make_source)
            await live.close(never)  # close without connect
            first = await live.open(make_source)
            await live.close(first)
            await live.close(first)  # idempotent
            second = await live.open(make_source)
            await live.close(second)
            third = await live.open(make_source)
            sent = self._messages(3)
            await produce(sent)
            await self._read_exactly(third, sent, self.read_timeout)

    async def test_empty_read(self, make_source: MakeSource, produce: Produce) -> None:
        """read_batch with nothing there returns None (or an empty batch) in time,
        repeatedly, and the source still delivers afterwards."""
        async with self._test() as live:
            source = await live.open(make_source)
            for _ in range(3):
                batch = await _bounded(source.read_batch(10, 0.3), 0.3 + READ_GRACE,
                                       "read_batch(10, max_wait=0.3) with nothing to read")
                assert batch is None or not batch.messages, (
                    f"read {len(batch.messages)} message(s) from a fresh, empty far side")
            sent = self._messages(2)
            await produce(sent)
            await self._read_exactly(source, sent, self.read_timeout)

    async def test_round_trip(self, make_source: MakeSource, produce: Produce) -> None:
        """A batch arrives byte-exact, once each, with headers/key/subject/id as declared."""
        async with self._test() as live:
            source = await live.open(make_source)
            sent = self._messages(self.batch_size)
            await produce(sent)
            got = await self._read_exactly(source, sent, self.read_timeout)
            self._check_order(sent, got)
            extra = await _drain(source, 0.5)
            assert not extra, f"{len(extra)} message(s) delivered again after their ack"

    async def test_ack_prevents_redelivery(
        self, make_source: MakeSource, produce: Produce
    ) -> None:
        """Acknowledged messages come back neither to the reader nor to a new instance."""
        self._need_acks()
        async with self._test() as live:
            first = await live.open(make_source)
            sent = self._messages(20)
            await produce(sent)
            await self._read_exactly(first, sent, self.read_timeout)
            again = await _drain(first, self.redelivery_wait)
            assert not again, (f"{len(again)} acknowledged message(s) redelivered within "
                               f"redelivery_wait={self.redelivery_wait}s")
            await live.close(first)
            second = await live.open(make_source)
            marker = self._messages(1, "after-ack", empty=False)
            await produce(marker)
            got = await collect(second, 1, self.read_timeout)
            got += await _drain(second, 1.0)
            _check_exact(marker, got)

    async def test_nack_redelivers(self, make_source: MakeSource, produce: Produce) -> None:
        """nack(delay=0) brings exactly the nacked batches back, with the same ids."""
        self._need_acks()
        async with self._test() as live:
            source = await live.open(make_source)
            sent = self._messages(10)
            await produce(sent)
            batches = await collect_batches(source, len(sent), self.read_timeout, max_messages=5)
            first_read = [m for b in batches for m in b.messages]
            _check_exact(sent, first_read)
            assert len(batches) >= 2
            await _bounded(batches[0].ack.ack(), 10, "ack()")
            nacked = [m for b in batches[1:] for m in b.messages]
            for batch in batches[1:]:
                await _bounded(batch.ack.nack(delay=0), 10, "nack(delay=0)")
            back = await collect(source, len(nacked), self.redelivery_wait + 5, max_messages=5)
            _check_exact(nacked, back)
            self._check_delivered(sent, first_read + back)
            more = await _drain(source, 1.0)
            assert not more, (f"{len(more)} message(s) delivered again after ack: "
                              f"{[_short(m.data) for m in more[:5]]}")

    async def test_unacked_survive_close(
        self, make_source: MakeSource, produce: Produce
    ) -> None:
        """Messages read but not acknowledged when an instance closes go to the next one."""
        self._need_acks()
        async with self._test() as live:
            first = await live.open(make_source)
            sent = self._messages(10)
            await produce(sent)
            batches = await collect_batches(first, len(sent), self.read_timeout, max_messages=5)
            first_read = [m for b in batches for m in b.messages]
            _check_exact(sent, first_read)
            await live.close(first)
            second = await live.open(make_source)
            back = await collect(second, len(sent), self.redelivery_wait + 10)
            _check_exact(sent, back)
            self._check_delivered(sent, first_read + back)
            more = await _drain(second, 1.0)
            assert not more, f"{len(more)} message(s) delivered again after ack"

    async def test_saturated_source_resumes(
        self, make_source: MakeSource, produce: Produce
    ) -> None:
        """Read without acknowledging until the source stops giving; after the acks,
        the rest flows: every message arrives at least once."""
        self._need_acks()
        async with self._test() as live:
            source = await live.open(make_source)
            sent = self._messages(self.saturate_count)
            await produce(sent)
            loop = asyncio.get_running_loop()
            held: list[Batch] = []
            bound = loop.time() + max(self.redelivery_wait, 5.0)
            while loop.time() < bound:
                batch = await _read_once(source, 50, self.saturation_quiet)
                if batch is None:
                    break  # saturated (or all read): nothing for a while
                held.append(batch)
            seen = [m for b in held for m in b.messages]
            assert seen, "nothing arrived before the acks"
            window = self.saturates_at
            if window is not None:
                distinct = len({m.data for m in seen})
                assert distinct <= window, (
                    f"{distinct} messages delivered unacknowledged; saturates_at={window}")
            for batch in held:
                await _bounded(batch.ack.ack(), 10, "ack()")
            want = {m.data for m in sent}
            have = {m.data for m in seen}
            deadline = loop.time() + self.read_timeout
            while have < want and loop.time() < deadline:
                more = await collect(source, len(want - have), 1.0, max_messages=50)
                seen.extend(more)
                have.update(m.data for m in more)
            _check_covers(sent, seen)
            self._check_delivered(sent, seen)

    async def test_reconnect_after_cut(
        self, make_source: MakeSource, produce: Produce, server_address: str,
        tcp_proxy: ProxyFactory,
    ) -> None:
        """After the connection is cut, the same instance delivers new messages."""
        async with self._test() as live:
            proxy = await tcp_proxy(*_split_address(server_address))
            source = await live.open(make_source, proxy.address)
            before = self._messages(10, "before")
            await produce(before)
            await self._read_exactly(source, before, self.read_timeout)
            assert proxy.accepted >= 1, "the source did not connect through the given address"
            accepted = proxy.accepted
            proxy.cut()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.reconnect_timeout
            if not self.at_least_once:
                await self._wait_until_listening(source, produce, deadline)
            after = self._messages(10, "after", empty=False)
            await produce(after)
            got: list[Message] = []
            want = {m.data for m in after}
            while not want <= {m.data for m in got} and loop.time() < deadline:
                got += await collect(source, len(after), deadline - loop.time())
            fresh = [m for m in got if m.data in want]
            _check_covers(after, fresh)
            self._check_delivered(after, fresh)
            assert proxy.accepted > accepted, "the source got messages without reconnecting"

    async def _wait_until_listening(
        self, source: Source[Any], produce: Produce, deadline: float
    ) -> None:
        """For sources that lose what is sent while they are away: send probes until
        one arrives, i.e. until the source listens again."""
        loop = asyncio.get_running_loop()
        n = 0
        while loop.time() < deadline:
            n += 1
            await produce([Message(f"probe-{n}".encode())])
            got = await collect(source, 1_000, 0.5)
            if any(m.data.startswith(b"probe-") for m in got):
                return
        raise AssertionError(f"the source did not listen again within "
                             f"{self.reconnect_timeout:g}s after the cut ({n} probes sent)")


# ---------------------------------------------------------------------- sinks


class SinkSuite(_Suite):
    """Conformance tests for a Sink plugin; see the module docstring."""

    max_message_bytes: ClassVar[int | None] = None
    dedupes_by_id: ClassVar[bool] = False
    message_subject: ClassVar[str | None] = None
    write_timeout: ClassVar[float] = 30.0
    fetch_timeout: ClassVar[float] = 20.0

    def _messages(self, n: int, tag: str | None = None, *, empty: bool = True
                  ) -> list[Message]:
        tag = f"{tag or ''}{_tag()}"
        now = time.time()
        return [
            Message(data, self.message_subject, f"key-{tag}-{i}".encode(),
                    {"X-Conformance-Index": str(i), "X-Conformance-Tag": f"{tag} {i};x=y"},
                    now, f"conformance:{tag}:{i}")
            for i, data in enumerate(_payloads(n, tag, empty=empty))
        ]

    async def _write(self, sink: Sink[Any], messages: Sequence[Message]) -> None:
        await _bounded(sink.write_batch(messages), self.write_timeout,
                       f"write_batch of {len(messages)} message(s)")

    async def _fetch(self, fetch: Fetch, count: int, timeout: float | None = None) -> list[
            Message]:
        limit = self.fetch_timeout if timeout is None else timeout
        got = await _bounded(fetch(count, limit), limit + 30.0, "the fetch fixture")
        assert isinstance(got, list), f"fetch returned {type(got).__name__}, not a list"
        return got

    def _check_delivered(self, sent: Sequence[Message], got: Sequence[Message]) -> None:
        by_data = _by_data(sent)
        for m in got:
            assert isinstance(m.data, bytes), f"fetched data is {type(m.data).__name__}"
            want = by_data.get(m.data)
            if want is None:
                continue
            if self.keeps_headers:
                _check_headers(want, m)
            if self.keeps_key:
                assert m.key == want.key, f"key: wrote {want.key!r}, fetched {m.key!r}"

    async def _write_retrying(self, sink: Sink[Any], messages: Sequence[Message],
                              deadline: float) -> int:
        """Write as the engine would: retry what failed retryably until ``deadline``.
        Returns how many message copies were handed to ``write_batch`` in all."""
        loop = asyncio.get_running_loop()
        pending = list(range(len(messages)))
        handed = 0
        last: Exception | None = None
        while pending:
            if loop.time() >= deadline:
                raise AssertionError(f"the sink did not recover within "
                                     f"{self.reconnect_timeout:g}s; last error: {last!r}")
            batch = [messages[i] for i in pending]
            handed += len(batch)
            try:
                await self._write(sink, batch)
            except RetryableError as exc:
                last = exc
                await asyncio.sleep(min(exc.retry_after or 0.5, 2.0))
                continue
            except PartialWriteError as exc:
                rejected = {i: e for i, e in exc.failed.items() if isinstance(e, RejectedError)}
                assert not rejected, f"valid messages rejected after a reconnect: {rejected!r}"
                last = exc
                pending = [pending[i] for i in sorted(exc.failed)]
                await asyncio.sleep(0.5)
                continue
            pending = []
        return handed

    # -- the tests

    @classmethod
    def applies(cls, test_name: str) -> bool:
        """See :meth:`SourceSuite.applies`."""
        if test_name == "test_oversized_message_rejected":
            return cls.max_message_bytes is not None
        if test_name == "test_dedupes_by_id":
            return cls.dedupes_by_id
        return True

    async def test_open_close(self, make_sink: MakeSink, fetch: Fetch) -> None:
        """close() without connect(), close() twice, a second open; then it still writes."""
        async with self._test() as live:
            never = await live.build(make_sink)
            await live.close(never)
            first = await live.open(make_sink)
            await live.close(first)
            await live.close(first)
            second = await live.open(make_sink)
            await live.close(second)
            third = await live.open(make_sink)
            sent = self._messages(3)
            await self._write(third, sent)
            got = await self._fetch(fetch, 3)
            _check_exact(sent, got)
            self._check_delivered(sent, got)

    async def test_round_trip(self, make_sink: MakeSink, fetch: Fetch) -> None:
        """One batch arrives byte-exact, once each, with headers/key as declared."""
        async with self._test() as live:
            sink = await live.open(make_sink)
            sent = self._messages(self.batch_size)
            await self._write(sink, sent)
            got = await self._fetch(fetch, len(sent))
            _check_exact(sent, got)
            self._check_delivered(sent, got)
            if self.keeps_order:
                assert [m.data for m in got] == [m.data for m in sent], \
                    "fetched out of the written order (keeps_order = True)"

    async def test_empty_payload(self, make_sink: MakeSink, fetch: Fetch) -> None:
        """A batch of one empty message is written and comes back empty."""
        async with self._test() as live:
            sink = await live.open(make_sink)
            sent = [Message(b"", self.message_subject, b"k", {"X-Empty": "yes"},
                            time.time(), f"conformance:{_tag()}:empty")]
            await self._write(sink, sent)
            got = await self._fetch(fetch, 1)
            assert [m.data for m in got] == [b""], f"fetched {[m.data for m in got]!r}"
            self._check_delivered(sent, got)

    async def test_headers(self, make_sink: MakeSink, fetch: Fetch) -> None:
        """Many headers with awkward values arrive (keeps_headers), or at least do not
        stop the message (otherwise)."""
        async with self._test() as live:
            sink = await live.open(make_sink)
            tag = _tag()
            headers = {f"X-Conformance-H{i:02d}": f"value {i} {tag}" for i in range(20)}
            headers.update({
                "X-Conformance-Spaces": "a b  c",
                "X-Conformance-Punct": "k=v; q=\"x\", <y>/z?&#",
                "X-Conformance-Long": "v" * 1000,
            })
            sent = [Message(f"headers {tag}".encode(), self.message_subject, None, headers,
                            time.time(), f"conformance:{tag}:headers")]
            await self._write(sink, sent)
            got = await self._fetch(fetch, 1)
            _check_exact(sent, got)
            self._check_delivered(sent, got)

    async def test_oversized_message_rejected(self, make_sink: MakeSink, fetch: Fetch) -> None:
        """Over max_message_bytes: RejectedError alone, PartialWriteError naming its
        index in a mixed batch whose other messages are written."""
        limit = self.max_message_bytes
        if limit is None:
            pytest.skip(f"{type(self).__name__}.max_message_bytes is None: no size limit")
        async with self._test() as live:
            sink = await live.open(make_sink)
            tag = _tag()
            big = Message(b"\xab" * (limit + 1), self.message_subject, None, {}, time.time(),
                          f"conformance:{tag}:big")
            try:
                await self._write(sink, [big])
            except RejectedError:
                pass
            except PartialWriteError as exc:
                assert set(exc.failed) == {0} and isinstance(exc.failed[0], RejectedError), (
                    f"a single oversized message: expected {{0: RejectedError}}, got "
                    f"{exc.failed!r}")
            else:
                raise AssertionError(f"a message of {limit + 1} bytes (max_message_bytes="
                                     f"{limit}) was accepted")
            small = self._messages(2, tag)
            try:
                await self._write(sink, [small[0], big, small[1]])
            except PartialWriteError as exc:
                assert set(exc.failed) == {1}, (
                    f"expected only index 1 to fail, got indices {sorted(exc.failed)}")
                assert isinstance(exc.failed[1], RejectedError), (
                    f"index 1 failed with {exc.failed[1]!r}, not RejectedError")
            except RejectedError as exc:
                raise AssertionError(
                    "RejectedError for a mixed batch would dead-letter its valid messages; "
                    f"raise PartialWriteError({{1: RejectedError}}) instead ({exc})") from None
            else:
                raise AssertionError("a mixed batch with an oversized message was accepted")
            got = await self._fetch(fetch, 2)
            _check_exact(small, got)

    async def test_dedupes_by_id(self, make_sink: MakeSink, fetch: Fetch) -> None:
        """The same batch written twice (a retry) leaves one copy of each message."""
        if not self.dedupes_by_id:
            pytest.skip(f"{type(self).__name__}.dedupes_by_id is False")
        async with self._test() as live:
            sink = await live.open(make_sink)
            sent = self._messages(10)
            await self._write(sink, sent)
            await self._write(sink, sent)
            got = await self._fetch(fetch, 2 * len(sent), timeout=3.0)
            _check_exact(sent, got)

    async def test_reconnect_after_cut(
        self, make_sink: MakeSink, fetch: Fetch, server_address: str,
        tcp_proxy: ProxyFactory,
    ) -> None:
        """After the connection is cut, the same instance writes again (retrying what
        failed, as the engine does); everything arrives at least once."""
        async with self._test() as live:
            proxy = await tcp_proxy(*_split_address(server_address))
            sink = await live.open(make_sink, proxy.address)
            before = self._messages(10, "before")
            await self._write(sink, before)
            assert proxy.accepted >= 1, "the sink did not connect through the given address"
            accepted = proxy.accepted
            proxy.cut()
            after = self._messages(10, "after", empty=False)
            deadline = asyncio.get_running_loop().time() + self.reconnect_timeout
            handed = await self._write_retrying(sink, after, deadline)
            everything = before + after
            got = await self._fetch(fetch, len(everything))
            if self.dedupes_by_id:
                _check_exact(everything, got)
            elif not {m.data for m in everything} <= {m.data for m in got}:
                # Duplicates from the retries may have filled the count first:
                # ask for as many copies as were handed to the sink.
                got += await self._fetch(fetch, len(before) + handed)
            _check_covers(everything, got)
            self._check_delivered(everything, got)
            assert proxy.accepted > accepted, "the sink wrote without reconnecting"
