"""The kit's own machinery: TcpProxy faults, server addresses, the pytest fixtures.

The proxy is checked against a local echo server on loopback (the proxy is a
plain TCP forwarder; no message system is involved).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from connector.testing import pytest_plugin
from connector.testing.proxy import TcpProxy
from connector.testing.servers import ServiceUnavailable, check_reachable, host_port

ProxyFactory = Callable[..., Awaitable[TcpProxy]]


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, int]]:
    """A loopback echo server; yields its (host, port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield "127.0.0.1", server.sockets[0].getsockname()[1]
    server.close()


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     data: bytes, timeout: float = 5.0) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout)


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_proxy_forwards_both_ways(echo: tuple[str, int], tcp_proxy: ProxyFactory) -> None:
    proxy = await tcp_proxy(*echo)
    host, port = proxy.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) != echo[1]
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = bytes(range(256)) * 1000
    assert await _roundtrip(reader, writer, payload) == payload
    assert proxy.accepted == 1 and proxy.connections == 1
    assert proxy.bytes_up == len(payload) and proxy.bytes_down == len(payload)
    writer.close()


async def test_cut_closes_live_connections_and_accepts_new_ones(
    echo: tuple[str, int], tcp_proxy: ProxyFactory
) -> None:
    proxy = await tcp_proxy(*echo)
    host, port = proxy.host, proxy.port
    reader, writer = await asyncio.open_connection(host, port)
    assert await _roundtrip(reader, writer, b"before") == b"before"
    proxy.cut()
    # The client sees its connection end (EOF or reset), promptly.
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _roundtrip(reader, writer, b"after")
    assert proxy.connections == 0
    reader2, writer2 = await asyncio.open_connection(host, port)
    assert await _roundtrip(reader2, writer2, b"again") == b"again"
    assert proxy.accepted == 2
    writer2.close()


async def test_refuse_closes_new_connections_until_turned_off(
    echo: tuple[str, int], tcp_proxy: ProxyFactory
) -> None:
    proxy = await tcp_proxy(*echo)
    proxy.refuse(True)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _roundtrip(reader, writer, b"x")
    assert proxy.refused == 1 and proxy.accepted == 0
    proxy.refuse(False)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    assert await _roundtrip(reader, writer, b"y") == b"y"
    writer.close()


async def test_stall_holds_bytes_until_resume(
    echo: tuple[str, int], tcp_proxy: ProxyFactory
) -> None:
    proxy = await tcp_proxy(*echo)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    assert await _roundtrip(reader, writer, b"warm") == b"warm"
    proxy.stall()
    assert proxy.stalled
    writer.write(b"held")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.5)
    assert proxy.bytes_up == 4  # "held" never left the proxy
    assert proxy.connections == 1  # still open
    proxy.resume()
    assert await asyncio.wait_for(reader.readexactly(4), 5.0) == b"held"
    writer.close()


async def test_delay_holds_each_chunk(echo: tuple[str, int], tcp_proxy: ProxyFactory) -> None:
    proxy = await tcp_proxy(*echo, delay=0.2)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _roundtrip(reader, writer, b"slow") == b"slow"
    # One chunk each way, each held 0.2 s: a round trip cannot be shorter.
    assert loop.time() - started >= 0.4
    writer.close()


async def test_latency_overlaps_chunks_in_flight_and_keeps_their_order(
    echo: tuple[str, int], tcp_proxy: ProxyFactory
) -> None:
    proxy = await tcp_proxy(*echo)
    proxy.latency, proxy.jitter = 0.3, 0.1
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = b"".join(b"%04d" % i for i in range(20))
    for i in range(20):  # 20 separate chunks, 20 ms apart
        writer.write(sent[4 * i:4 * i + 4])
        await writer.drain()
        await asyncio.sleep(0.02)
    got = await asyncio.wait_for(reader.readexactly(len(sent)), 10.0)
    elapsed = loop.time() - started
    assert got == sent  # jitter never reorders
    # each way at least latency - jitter; pipelined, so far less than 20 chunks
    # one after another (20 x 0.4 s even one way) would take
    assert 0.4 <= elapsed < 2.0
    proxy.latency = proxy.jitter = 0.0
    started = loop.time()
    assert await _roundtrip(reader, writer, b"fast") == b"fast"
    assert loop.time() - started < 0.2
    writer.close()


async def test_cut_under_latency_ends_the_link_with_chunks_in_flight(
    echo: tuple[str, int], tcp_proxy: ProxyFactory
) -> None:
    proxy = await tcp_proxy(*echo)
    proxy.latency = 5.0
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"in flight")
    await writer.drain()
    await asyncio.sleep(0.1)
    proxy.cut()
    assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed, not held 5 s
    assert proxy.connections == 0


async def test_close_stops_listening(echo: tuple[str, int]) -> None:
    proxy = await TcpProxy(*echo).start()
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    assert await _roundtrip(reader, writer, b"x") == b"x"
    await proxy.close()
    await proxy.close()  # idempotent
    assert proxy.connections == 0
    with pytest.raises(OSError):
        await asyncio.open_connection(proxy.host, proxy.port)


def test_host_port_reads_every_address_form() -> None:
    assert host_port("nats", "nats://u:p@10.0.0.5:4333,nats://b:4222") == ("10.0.0.5", 4333)
    assert host_port("nats", "nats://127.0.0.1") == ("127.0.0.1", 4222)
    assert host_port("kafka", "k1:9095,k2:9092") == ("k1", 9095)
    assert host_port("redis", "redis://127.0.0.1/0") == ("127.0.0.1", 6379)
    assert host_port("postgres", "postgresql://a:b@db:5433/x") == ("db", 5433)
    assert host_port("postgres", "host=db2 port=5434 user=a") == ("db2", 5434)


def test_unreachable_server_names_the_start_command(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    monkeypatch.setenv("KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    with pytest.raises(ServiceUnavailable) as info:
        check_reachable("kafka", timeout=1.0)
    text = str(info.value)
    assert f"127.0.0.1:{port}" in text
    assert "KAFKA_BOOTSTRAP" in text
    assert "scripts/services start kafka" in text


def test_reachable_server_gives_its_address(nats_url: str) -> None:
    assert check_reachable("nats") == nats_url


def test_server_fixture_fails_rather_than_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{_free_port()}/0")
    with pytest.raises(pytest.fail.Exception, match="scripts/services start redis"):
        pytest_plugin._require("redis")


def test_unique_fits_every_name(unique: str) -> None:
    # Lower-case letters and digits: valid in subjects, stream names, topics, SQL.
    assert unique.isalnum() and unique == unique.lower() and 6 <= len(unique) <= 16
