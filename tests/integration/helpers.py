"""Shared pieces of the NATS integration tests.

- ``NatsconnProcess``: ``natsconn run FILE`` as a child process on a free HTTP
  port, with its /readyz, /metrics, RSS and log at hand.
- ``run_in_process``: the same supervisor inside the test's event loop.
- raw nats-py legs: pipelined JetStream publishing with PubAcks, core
  publishing, a core subscriber that records what arrives, reading a whole
  stream back, consumer info.
- ``wait_until``: every wait in these tests is bounded and says what it
  waited for when it gives up.

Payloads are ``{"seq": N}`` so every message names itself: the tests compare
sets of sequence numbers, never just counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import yaml
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from prometheus_client.parser import text_string_to_metric_families

from connector.config.loader import load_file
from connector.engine.supervisor import Supervisor
from connector.ops.metrics import REGISTRY
from connector.registry import Registry

NATSCONN = str(Path(sys.executable).with_name("natsconn"))

# Header values that are odd but legal for NATS: colons, non-ASCII, quotes and
# punctuation, doubled spaces and a tab, a mixed-case name.
ODD_HEADERS: dict[str, str] = {
    "X-Odd-Colons": "a:b: c::d",
    "X-Odd-Unicode": "Grüße ✓ 東京",
    "x-Mixed-CASE": "=?&%/\\\"'<>{}[]#;,  two  spaces\tand a tab",
}


# ------------------------------------------------------------------ payloads


def payload(seq: int) -> bytes:
    return b'{"seq":%d}' % seq


def seq_of(data: bytes) -> int:
    return int(json.loads(data)["seq"])


# ------------------------------------------------------------------- waiting


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------- pipeline file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pipeline_file(
    tmp_path: Path, pipelines: list[dict[str, Any]], name: str = "pipeline.yaml",
    **settings: Any,
) -> Path:
    """Write a pipeline file (YAML) into ``tmp_path``; ``settings`` are top-level keys."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"pipelines": pipelines, **settings}, sort_keys=False,
                                   allow_unicode=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------ metrics


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """``{(sample name, pipeline label): value}`` from Prometheus text."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            pipeline = sample.labels.get("pipeline")
            if pipeline is None:
                continue
            key = (sample.name, pipeline)
            out[key] = out.get(key, 0.0) + sample.value  # summed over other labels
    return out


def local_metric(name: str, pipeline: str, **labels: str) -> float:
    """A metric of a pipeline run in this process."""
    return REGISTRY.get_sample_value(name, {"pipeline": pipeline, **labels}) or 0.0


# --------------------------------------------------------------- the process


@dataclass
class NatsconnProcess:
    """``natsconn run FILE --http-address 127.0.0.1:PORT`` as a child process."""

    proc: asyncio.subprocess.Process
    file: Path
    log_path: Path
    port: int
    started: float = field(default_factory=time.monotonic)

    @classmethod
    async def start(
        cls, file: Path, log_name: str | None = None, env: Mapping[str, str] | None = None,
        log_format: str = "json",
    ) -> NatsconnProcess:
        port = free_port()
        log_path = file.with_name(log_name or f"{file.stem}.{port}.log")
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                NATSCONN, "run", str(file), "--http-address", f"127.0.0.1:{port}",
                "--log-format", log_format,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, **(env or {})},
            )
        return cls(proc, file, log_path, port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """(status, body) of GET ``path``; (0, b"") while nothing listens."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), timeout)
        except (OSError, TimeoutError):
            return 0, b""
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: natsconn\r\n\r\n".encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        return status, body

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = await self.http_get("/readyz")
        return status, (json.loads(body) if body else {})

    async def metrics(self) -> dict[tuple[str, str], float]:
        status, body = await self.http_get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return parse_metrics(body.decode())

    async def metric(self, name: str, pipeline: str) -> float:
        return (await self.metrics()).get((name, pipeline), 0.0)

    async def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for /readyz 200; fail early (with the log) if the process exits."""
        state: dict[str, Any] = {}

        async def ready() -> bool:
            nonlocal state
            if self.proc.returncode is not None:
                raise AssertionError(f"natsconn exited with {self.proc.returncode} before "
                                     f"it was ready; log:\n{self.log()}")
            status, state = await self.readyz()
            return status == 200

        try:
            await wait_until(ready, timeout, f"/readyz 200 from {self.file.name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last /readyz {state}; log:\n{self.log()}") from None
        return state

    def rss_bytes(self) -> int:
        """Resident set size of the process, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"natsconn did not exit within {timeout}s; log:\n"
                                 f"{self.log()}") from None

    async def kill(self) -> None:
        """SIGKILL and reap (used for crashes and for cleanup)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)


@contextlib.asynccontextmanager
async def natsconn_process(file: Path, ready: bool = True,
                           **kwargs: Any) -> AsyncIterator[NatsconnProcess]:
    """A running natsconn; killed at the end if the test left it running."""
    proc = await NatsconnProcess.start(file, **kwargs)
    try:
        if ready:
            await proc.wait_ready()
        yield proc
    finally:
        await proc.kill()


# ----------------------------------------------------------- in this process


@contextlib.asynccontextmanager
async def run_in_process(
    file: Path, registry: Registry | None = None, stop_timeout: float = 10.0,
) -> AsyncIterator[Supervisor]:
    """The supervisor of ``file`` running in this event loop; stopped gracefully at
    the end (and the stop itself is bounded)."""
    loaded = load_file(file, registry)
    supervisor = Supervisor(loaded, "natsconn-test")
    task = asyncio.create_task(supervisor.run())
    try:
        yield supervisor
    finally:
        supervisor.stop(stop_timeout)
        try:
            await asyncio.wait_for(task, stop_timeout + 5)
        except TimeoutError:
            raise AssertionError(f"in-process natsconn did not stop within "
                                 f"{stop_timeout + 5}s") from None


async def wait_ready_in_process(supervisor: Supervisor, timeout: float = 20.0) -> None:
    await wait_until(lambda: supervisor.ready()[0], timeout,
                     f"pipelines running (states {supervisor.ready()[1]})")


# ------------------------------------------------------------------ raw NATS


async def connect(url: str) -> NATS:
    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3,
                              pending_size=64 * 1024 * 1024)


async def create_stream(nc: NATS, name: str, subjects: list[str]) -> None:
    await nc.jetstream().add_stream(name=name, subjects=subjects)


async def publish_js(
    nc: NATS, subject: str | Callable[[int], str], count: int, *, start: int = 0,
    headers: Mapping[str, str] | Callable[[int], Mapping[str, str] | None] | None = None,
    data: Callable[[int], bytes] = payload, window: int = 2000, timeout: float = 30.0,
) -> None:
    """Publish ``count`` messages to JetStream with pipelined PubAcks.

    Each window of messages goes out at once, each with its own reply subject on
    one inbox; the next window goes once every PubAck of this one is in (the
    technique the issue measured at ~89k msg/s, against ~23k for publish_async).
    Fails on a PubAck error or a missing PubAck.
    """
    inbox = nc.new_inbox()
    acked = 0
    errors: list[bytes] = []
    window_done = asyncio.Event()
    target = 0

    async def on_ack(msg: Msg) -> None:
        nonlocal acked
        if b'"error"' in msg.data or (msg.headers or {}).get("Status") == "503":
            errors.append(msg.data or b"503 no responders")
        acked += 1
        if acked >= target:
            window_done.set()

    sub = await nc.subscribe(inbox + ".*", cb=on_ack, pending_msgs_limit=-1,
                             pending_bytes_limit=-1)
    if callable(headers):
        headers_of = headers
    else:
        fixed = dict(headers) if headers else None
        headers_of = lambda _i: fixed  # noqa: E731
    try:
        subject_of = subject if callable(subject) else (lambda _i: subject)
        for first in range(start, start + count, window):
            last = min(first + window, start + count)
            target = acked + (last - first)
            window_done.clear()
            for i in range(first, last):
                hdrs = headers_of(i)
                await nc.publish(subject_of(i), data(i), reply=f"{inbox}.{i}",
                                 headers=dict(hdrs) if hdrs else None)
            await nc.flush()
            try:
                await asyncio.wait_for(window_done.wait(), timeout)
            except TimeoutError:
                raise AssertionError(f"PubAcks missing: {target - acked} of window "
                                     f"{first}..{last}") from None
            assert not errors, f"PubAck errors: {errors[:3]}"
    finally:
        await sub.unsubscribe()


async def publish_core(
    nc: NATS, subject: str, count: int, *, start: int = 0,
    headers: Mapping[str, str] | None = None, flush_every: int = 1000,
) -> None:
    """Core publish, with a PING/PONG flush every ``flush_every`` messages so the
    publisher cannot run far ahead of the server."""
    hdrs = dict(headers) if headers else None
    for i in range(start, start + count):
        await nc.publish(subject, payload(i), headers=hdrs)
        if (i - start + 1) % flush_every == 0:
            await nc.flush(timeout=10)
    await nc.flush(timeout=10)


class Collector:
    """A core NATS subscription that records every message that arrives."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []
        self._sub: Any = None

    @classmethod
    async def subscribe(cls, nc: NATS, subject: str) -> Collector:
        self = cls()

        async def on_msg(msg: Msg) -> None:
            self.messages.append(msg)

        self._sub = await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=-1,
                                       pending_bytes_limit=-1)
        await nc.flush()
        return self

    def __len__(self) -> int:
        return len(self.messages)

    def seqs(self) -> list[int]:
        return [seq_of(m.data) for m in self.messages]

    async def wait_for(self, count: int, timeout: float) -> None:
        await wait_until(lambda: len(self.messages) >= count, timeout,
                         f"{count} messages on the core subscription (have "
                         f"{len(self.messages)})")


async def stream_count(nc: NATS, stream: str) -> int:
    info = await nc.jetstream().stream_info(stream)
    return int(info.state.messages)


async def wait_stream_count(nc: NATS, stream: str, count: int, timeout: float,
                            interval: float = 0.2) -> None:
    last = -1

    async def enough() -> bool:
        nonlocal last
        try:
            last = await stream_count(nc, stream)
        except nats.js.errors.NotFoundError:
            return False
        return last >= count

    try:
        await wait_until(enough, timeout, f"{count} messages in stream {stream}", interval)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (has {last})") from None


async def read_stream(nc: NATS, stream: str, timeout: float = 60.0) -> list[Msg]:
    """Every message now in ``stream``, through one ephemeral push consumer
    (no acks, flow control so the server never cuts us off as a slow consumer):
    fast enough for 100k messages."""
    js = nc.jetstream()
    expected = await stream_count(nc, stream)
    got: list[Msg] = []
    done = asyncio.Event()
    if expected == 0:
        return got
    inbox = nc.new_inbox()

    async def on_msg(msg: Msg) -> None:
        if msg.headers and "Status" in msg.headers and not msg.data:
            if msg.reply:  # flow control: the server waits for this answer
                await nc.publish(msg.reply, b"")
            return
        got.append(msg)
        if len(got) >= expected:
            done.set()

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
    info = await js.add_consumer(stream, api.ConsumerConfig(
        deliver_subject=inbox, ack_policy=api.AckPolicy.NONE,
        deliver_policy=api.DeliverPolicy.ALL, inactive_threshold=30.0,
        flow_control=True, idle_heartbeat=5.0,
    ))
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"read {len(got)} of {expected} messages of {stream} in "
                             f"{timeout}s") from None
    finally:
        await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)
    return got


async def consumer_info(nc: NATS, stream: str, durable: str) -> api.ConsumerInfo:
    info: api.ConsumerInfo = await nc.jetstream().consumer_info(stream, durable)
    return info


async def ack_floor(nc: NATS, stream: str, durable: str) -> int:
    """The stream sequence up to which the consumer has every message acknowledged."""
    floor = (await consumer_info(nc, stream, durable)).ack_floor
    return int(floor.stream_seq) if floor is not None and floor.stream_seq else 0


async def wait_consumer_drained(nc: NATS, stream: str, durable: str, timeout: float) -> None:
    """Every message delivered and acknowledged: num_pending and num_ack_pending 0."""
    last: Any = None

    async def drained() -> bool:
        nonlocal last
        last = await consumer_info(nc, stream, durable)
        return bool(last.num_pending == 0 and last.num_ack_pending == 0)

    try:
        await wait_until(drained, timeout, f"consumer {durable} drained", 0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: num_pending {last.num_pending}, num_ack_pending "
                             f"{last.num_ack_pending}") from None


def assert_exactly(seqs: list[int], count: int, where: str) -> None:
    """Each of 0..count-1 once, nothing else."""
    seen = set(seqs)
    missing = sorted(set(range(count)) - seen)
    extra = sorted(seen - set(range(count)))
    dupes = len(seqs) - len(seen)
    assert not missing and not extra and dupes == 0, (
        f"{where}: {len(seqs)} messages for {count} sequence numbers; missing "
        f"{len(missing)} (first {missing[:10]}), unexpected {extra[:10]}, {dupes} duplicates")


def assert_all_present(seqs: list[int], count: int, where: str) -> None:
    """Each of 0..count-1 at least once (duplicates allowed: at least once)."""
    missing = sorted(set(range(count)) - set(seqs))
    assert not missing, (f"{where}: {len(missing)} of {count} sequence numbers never arrived "
                         f"(first {missing[:10]})")


def assert_headers(messages: list[Msg], expected: Mapping[str, str], where: str) -> None:
    bad = [m for m in messages
           if any((m.headers or {}).get(k) != v for k, v in expected.items())]
    assert not bad, (f"{where}: {len(bad)} of {len(messages)} messages lost or changed "
                     f"headers; first has {bad[0].headers!r}, expected {dict(expected)!r}")

