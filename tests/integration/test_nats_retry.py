"""Issue 2: a sink that fails transiently is retried and every message arrives.

Two ways of failing: the JetStream sink's connection is cut by a TCP proxy in
the middle of the stream (the client reconnects, unconfirmed batches are
retried, Nats-Msg-Id drops the copies the server already had); and a sink
that raises RetryableError on its first calls, some before writing and some
after (a lost confirmation). Both run in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from natsconn_nats.jetstream_sink import JetStreamSink, JetStreamSinkConfig
from natsconn_nats.jetstream_source import JetStreamSource
from natsconn_nats.sink import NatsSink

from connector import Message, RetryableError
from connector.registry import Registry

from .helpers import (
    Collector,
    assert_all_present,
    assert_exactly,
    consumer_info,
    create_stream,
    local_metric,
    payload,
    pipeline_file,
    publish_js,
    read_stream,
    run_in_process,
    seq_of,
    stream_count,
    wait_consumer_drained,
    wait_ready_in_process,
    wait_stream_count,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]


async def test_sink_connection_cut_mid_stream_every_message_arrives(
        nc: NATS, nats_url: str, nats_address: tuple[str, int], unique: str,
        tmp_path: Path, tcp_proxy: Any) -> None:
    n = 20_000
    source, target, durable = f"CUT_IN_{unique}", f"CUT_OUT_{unique}", f"cut-{unique}"
    pipeline = f"cut-{unique}"
    await create_stream(nc, source, [f"cutin.{unique}.>"])
    await create_stream(nc, target, [f"cutout.{unique}.>"])
    await publish_js(nc, f"cutin.{unique}.x", n)
    proxy = await tcp_proxy(*nats_address)
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                   "durable": durable},
        "sink": {"type": "jetstream", "servers": [f"nats://{proxy.address}"],
                 "subject": f"cutout.{unique}.x", "ack_timeout": "2s",
                 "reconnect_wait": "100ms"},
        "batch": {"max_messages": 200}, "max_in_flight": 2,
        "retry": {"initial_backoff": "50ms", "max_backoff": "1s"},
    }])
    cuts: list[int] = []
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        for _ in range(2):  # a cut, and another once the flow has resumed
            at = cuts[-1] + 2000 if cuts else n // 5
            await wait_stream_count(nc, target, at, timeout=30, interval=0.02)
            cuts.append(await stream_count(nc, target))
            proxy.cut()
        await wait_stream_count(nc, target, n, timeout=60)
        await wait_consumer_drained(nc, source, durable, timeout=30)
    assert cuts[-1] < n, f"the stream was through ({cuts}) before the last cut"
    assert local_metric("natsconn_reconnects_total", pipeline, role="sink") >= 1
    assert proxy.accepted >= 3  # the sink came back through the proxy after each cut
    got = await read_stream(nc, target)
    assert_exactly([seq_of(m.data) for m in got], n, f"stream {target} (cut at {cuts})")
    print(f"cut at {cuts}; {local_metric('natsconn_retries_total', pipeline):.0f} retries, "
          f"{proxy.accepted} connections through the proxy")


class FlakySinkConfig(JetStreamSinkConfig):
    fail_before: int = 2  # first calls raise before writing anything
    fail_after: int = 2  # next calls write, then raise (a lost confirmation)


class FlakyJetStreamSink(JetStreamSink):
    """The JetStream sink, failing its first calls with RetryableError."""

    Config = FlakySinkConfig
    config: FlakySinkConfig

    calls = 0

    async def write_batch(self, messages: Sequence[Message]) -> None:
        self.calls += 1
        cfg = self.config
        if self.calls <= cfg.fail_before:
            raise RetryableError(f"injected failure {self.calls} before the write")
        await super().write_batch(messages)
        if self.calls <= cfg.fail_before + cfg.fail_after:
            raise RetryableError(f"injected failure {self.calls} after the write")


async def test_retryable_sink_failures_are_retried_every_message_arrives(
        nc: NATS, nats_url: str, unique: str, tmp_path: Path) -> None:
    n = 2_000
    source, target, durable = f"FLK_IN_{unique}", f"FLK_OUT_{unique}", f"flk-{unique}"
    pipeline = f"flaky-{unique}"
    await create_stream(nc, source, [f"flkin.{unique}.>"])
    await create_stream(nc, target, [f"flkout.{unique}.>"])
    await publish_js(nc, f"flkin.{unique}.x", n)
    registry = Registry.make_test_instance({
        "source": {"jetstream": JetStreamSource},
        "sink": {"flaky_jetstream": FlakyJetStreamSink},
    })
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                   "durable": durable},
        "sink": {"type": "flaky_jetstream", "servers": [nats_url],
                 "subject": f"flkout.{unique}.x", "fail_before": 2, "fail_after": 2},
        "batch": {"max_messages": 100}, "max_in_flight": 1,
        "retry": {"initial_backoff": "20ms", "max_backoff": "200ms"},
    }])
    async with run_in_process(file, registry) as supervisor:
        await wait_ready_in_process(supervisor)
        await wait_consumer_drained(nc, source, durable, timeout=30)
        await wait_stream_count(nc, target, n, timeout=10)
        pipe = supervisor.records[pipeline].current
        assert pipe is not None
        calls = pipe.sink.calls  # type: ignore[attr-defined]
    assert local_metric("natsconn_retries_total", pipeline) == 4
    assert local_metric("natsconn_dead_lettered_total", pipeline) == 0
    assert local_metric("natsconn_messages_out_total", pipeline) == n
    # every call but the four failed ones wrote a batch (linger may split batches)
    assert calls == local_metric("natsconn_batches_written_total", pipeline) + 4
    got = await read_stream(nc, target)
    # The two writes whose confirmation was "lost" were written twice; the
    # stream kept one copy of each (Nats-Msg-Id).
    assert_exactly([seq_of(m.data) for m in got], n, f"stream {target}")


async def test_core_nats_sink_stalled_past_flush_timeout_then_cut_every_message_arrives(
        nc: NATS, nats_url: str, nats_address: tuple[str, int], unique: str,
        tmp_path: Path, tcp_proxy: Any) -> None:
    """The core NATS sink confirms a batch with a flush (PING/PONG). A stall
    longer than flush_timeout fails writes, which are retried; after the stall
    the sink must still confirm what it writes, so that when the connection is
    then cut nothing acknowledged at the source is lost.

    Fails with nats-py 2.16 and the current NatsSink: ``nc.flush(timeout)``
    cancels its PONG future on timeout but leaves it queued; the late PONG then
    raises InvalidStateError in ``Client._process_pong`` and kills the read loop.
    The client still reports itself connected, and every later ``flush()`` falls
    back to a bare write with no PONG, so batches written into the cut socket are
    counted as written and acked at the source: lost. A NatsSink that never lets
    nats-py's flush time out (wait for it with its own timeout, not cancel it)
    avoids this."""
    n = 30_000
    source, durable = f"STC_IN_{unique}", f"stc-{unique}"
    pipeline = f"stall-core-{unique}"
    await create_stream(nc, source, [f"stcin.{unique}.>"])
    await publish_js(nc, f"stcin.{unique}.x", n)
    out = await Collector.subscribe(nc, f"stcout.{unique}.>")
    proxy = await tcp_proxy(*nats_address)
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": source,
                   "durable": durable, "ack_wait": "3s"},
        "sink": {"type": "nats", "servers": [f"nats://{proxy.address}"],
                 "subject": f"stcout.{unique}.x", "flush_timeout": 1.0,
                 "reconnect_wait": "100ms"},
        "batch": {"max_messages": 100}, "max_in_flight": 1,
        "retry": {"initial_backoff": "50ms", "max_backoff": "500ms"},
    }])
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await out.wait_for(2000, timeout=30)
        proxy.stall()
        await wait_until(lambda: local_metric("natsconn_retries_total", pipeline) >= 1, 10,
                         "a write failed by the flush timeout")
        proxy.resume()
        resumed = len(out)
        await out.wait_for(resumed + 500, timeout=10)
        proxy.cut()
        at_cut = len(out)
        try:
            await wait_until(lambda: set(out.seqs()) >= set(range(n)), 15,
                             f"all {n} sequence numbers on the core subscriber")
        except AssertionError as exc:
            info = await consumer_info(nc, source, durable)
            lost = n - len(set(out.seqs()))
            raise AssertionError(
                f"{exc}: {lost} messages LOST (acked at the source, never delivered); "
                f"{n - lost} distinct received ({resumed} at the resume, "
                f"{at_cut} at the cut); natsconn wrote "
                f"{local_metric('natsconn_messages_out_total', pipeline):.0f}, in flight "
                f"{local_metric('natsconn_in_flight_messages', pipeline):.0f}, reconnects "
                f"{local_metric('natsconn_reconnects_total', pipeline, role='sink'):.0f}; "
                f"source ack floor {info.ack_floor}, num_pending {info.num_pending}, "
                f"num_ack_pending {info.num_ack_pending}") from None
    assert at_cut < n, f"the stream was through ({at_cut}) before the cut"
    assert_all_present(out.seqs(), n, "core subscriber")


async def test_jetstream_sink_write_fails_at_once_when_the_connection_drops(
        nc: NATS, nats_url: str, nats_address: tuple[str, int], unique: str,
        tcp_proxy: Any) -> None:
    """PubAcks sent to a lost connection never come: a write waiting for them
    fails as retryable when the connection drops, not after ack_timeout (60 s
    here), and its retry after the reconnect stores each message once."""
    target = f"DROP_{unique}"
    await create_stream(nc, target, [f"drop.{unique}.>"])
    proxy = await tcp_proxy(*nats_address)
    sink = JetStreamSink.make_test_instance(
        servers=[f"nats://{proxy.address}"], subject=f"drop.{unique}.x", ack_timeout=60.0,
        reconnect_wait="100ms")
    await sink.connect()
    messages = [Message(b"%d" % i, id=f"drop-{unique}-{i}") for i in range(100)]
    try:
        proxy.stall()  # the publishes go out, the PubAcks are held
        write = asyncio.create_task(sink.write_batch(messages))
        await asyncio.sleep(0.5)
        assert not write.done()
        started = asyncio.get_running_loop().time()
        proxy.cut()
        with pytest.raises(RetryableError, match="connection to the server lost"):
            await asyncio.wait_for(write, 10)
        assert asyncio.get_running_loop().time() - started < 10
        proxy.resume()
        await sink.write_batch(messages)  # the retry, after the reconnect
    finally:
        await sink.close()
    got = await read_stream(nc, target)
    assert sorted(int(m.data) for m in got) == list(range(100))


async def write_as_the_engine_would(sink: NatsSink, batch: list[Message]) -> None:
    """Retry a retryable failure, 0.1 s apart, for up to 10 s."""
    for _ in range(100):
        try:
            await sink.write_batch(batch)
            return
        except RetryableError:
            await asyncio.sleep(0.1)
    raise AssertionError("the write kept failing for 10 s")


async def core_sink_behind_proxy(nc: NATS, nats_address: tuple[str, int], tcp_proxy: Any,
                                 prefix: str) -> tuple[Collector, Any, NatsSink]:
    """A subscriber on ``prefix.>`` and a connected core NATS sink publishing to
    ``prefix.x`` through a TCP proxy, with a 1 s flush timeout."""
    out = await Collector.subscribe(nc, f"{prefix}.>")
    proxy = await tcp_proxy(*nats_address)
    sink = NatsSink.make_test_instance(servers=[f"nats://{proxy.address}"],
                                       subject=f"{prefix}.x", flush_timeout=1.0,
                                       reconnect_wait="100ms")
    await sink.connect()
    return out, proxy, sink


@pytest.mark.parametrize("retry_first", [True, False],
                         ids=["retry-then-next-batch", "next-batch-then-retry"])
async def test_core_nats_sink_retries_during_a_stall_send_each_message_once(
        nc: NATS, nats_address: tuple[str, int], unique: str, tcp_proxy: Any,
        retry_first: bool) -> None:
    """A stall longer than flush_timeout fails the write, and the retries fail
    too while it lasts; but the connection stays up and the first attempt's
    bytes are still queued in it. The retries must not queue the batch again:
    when the stall ends every message arrives once, not once per attempt. That
    holds whether the retry comes before the next batch or after it (whose
    flush already confirmed the retried batch's bytes: max_in_flight > 1)."""
    out, proxy, sink = await core_sink_behind_proxy(nc, nats_address, tcp_proxy,
                                                    f"stallonce.{unique}")
    first = [Message(payload(i)) for i in range(1000)]
    second = [Message(payload(i)) for i in range(1000, 1500)]
    try:
        proxy.stall()
        for _ in range(3):
            with pytest.raises(RetryableError, match=r"[Ff]lush"):
                await sink.write_batch(first)
        proxy.resume()
        for batch in ([first, second] if retry_first else [second, first]):
            await write_as_the_engine_would(sink, batch)
        await out.wait_for(1500, timeout=10)
        await asyncio.sleep(0.5)  # room for copies that should not come
    finally:
        await sink.close()
    assert_exactly(out.seqs(), 1500, "core subscriber")


async def test_core_nats_sink_publishes_again_after_a_reconnect(
        nc: NATS, nats_address: tuple[str, int], unique: str, tcp_proxy: Any) -> None:
    """What was queued for a connection that is then lost may be gone: after a
    reconnect, the retry of a batch whose flush timed out publishes it again."""
    out, proxy, sink = await core_sink_behind_proxy(nc, nats_address, tcp_proxy,
                                                    f"stallcut.{unique}")
    batch = [Message(payload(i)) for i in range(1000)]
    try:
        proxy.stall()
        with pytest.raises(RetryableError):
            await sink.write_batch(batch)
        proxy.cut()  # the held bytes are dropped with the connection
        proxy.resume()
        await write_as_the_engine_would(sink, batch)  # retried until reconnected
        await out.wait_for(1000, timeout=10)
    finally:
        await sink.close()
    assert_all_present(out.seqs(), 1000, "core subscriber")


async def test_jetstream_sink_publishes_nothing_more_while_the_connection_stays_stalled(
        nc: NATS, nats_address: tuple[str, int], unique: str, tcp_proxy: Any) -> None:
    """PubAcks time out because the connection is stalled, not broken: the
    publishes are still queued in the client. The retries during the stall must
    not queue the batch again (a copy per retry round); once the connection
    moves, the retry takes the PubAcks of the queued publishes instead of
    publishing again. With deduplication off the stream shows it: one copy of
    each message, not one per attempt (nor two: the queued one and the retry's)."""
    target = f"JSSTALL_{unique}"
    await create_stream(nc, target, [f"jsstall.{unique}.>"])
    proxy = await tcp_proxy(*nats_address)
    sink = JetStreamSink.make_test_instance(
        servers=[f"nats://{proxy.address}"], subject=f"jsstall.{unique}.x",
        ack_timeout=1.0, dedupe=False, reconnect_wait="100ms")
    await sink.connect()
    messages = [Message(payload(i)) for i in range(1000)]
    try:
        proxy.stall()
        with pytest.raises(RetryableError, match="no PubAck within"):
            await sink.write_batch(messages)
        for _ in range(3):
            with pytest.raises(RetryableError, match="connection is stalled"):
                await sink.write_batch(messages)
        proxy.resume()
        await sink.write_batch(messages)
    finally:
        await sink.close()
    got = await read_stream(nc, target)
    seqs = sorted(seq_of(m.data) for m in got)
    assert seqs == list(range(1000)), (
        f"{len(seqs)} messages stored for 1000 (expected each once)")
