"""The fault matrix: every at-least-once pipeline pair through every fault.

One cell: N messages (``{"seq": i}``) are put at the source; ``natsconn run``
(a child process) carries them to the sink through a TCP proxy
(:class:`connector.testing.proxy.TcpProxy`, which also paces the flow so that
faults land mid-stream); once a fifth has arrived the fault is injected; when
the sink has stopped changing, natsconn is stopped with SIGTERM and the sink is
read back. ``lost`` = sequence numbers that never arrived, ``duplicated`` =
copies beyond the first.

Faults:

* ``cut``: the proxy aborts natsconn's connections to the sink server, twice;
* ``restart``: ``scripts/services restart`` of the sink's server;
* ``stall``: the proxy stops forwarding for longer than the source's ack wait
  (JetStream ack_wait, Redis min_idle_time, outbox lease: 5 s), then resumes;
* ``kill``: ``kill -9`` of natsconn mid-stream (writes in flight, acks not yet
  sent), then a new natsconn with the same file finishes the job;
* ``term``: SIGTERM mid-stream (a graceful stop: in-flight writes finish and are
  acknowledged), then a new natsconn finishes the job.

Network faults (the sink's path detours through a network namespace of the
cell's own, :mod:`.netns`; the kernel drops or limits the packets there):

* ``latency``: 50 ms ± 10 ms each way, for 20 s (from the host-side proxy:
  this kernel has no netem);
* ``loss1``, ``loss5``: 1 % and 5 % of the packets dropped, each way, for 20 s;
* ``partition``: every packet dropped for 30 s, connections left open;
* ``bandwidth``: the link limited to 10 Mbit/s for 20 s.

Verdict per cell: ``lost`` must be 0 (every pair's source is at least once in
docs/delivery.md) and ``duplicated`` 0 where the sink deduplicates by id
(JetStream, PostgreSQL) and the source gives ids (all but the Redis list), and
after a graceful stop (``term``) everywhere: what was written was acknowledged.

Run by hand: ``scripts/reliability`` (see ``--help``); the small CI version is
tests/reliability/test_matrix_small.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import platform
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from integration.helpers import NatsconnProcess

from connector.testing.proxy import TcpProxy

from . import private
from .legs import AT_LEAST_ONCE, PAIRS, SINKS, SOURCES, SinkLeg, SourceLeg
from .netns import Detour

NET_FAULTS = ("latency", "loss1", "loss5", "partition", "bandwidth")
FAULTS = ("cut", "restart", "stall", "kill", "term", *NET_FAULTS)
NET_WINDOW = 20.0         # seconds a degraded link lasts
PARTITION_SECONDS = 30.0
STALL_SECONDS = 12.0      # > the sources' 5 s ack wait / min idle / lease
PACE_SECONDS = 0.004      # proxy delay per forwarded chunk: keeps the flow catchable
FLOW: dict[str, Any] = {
    "batch": {"max_messages": 50, "max_wait": "10ms"}, "max_in_flight": 2,
    "in_progress_interval": "1s",
    "retry": {"initial_backoff": "100ms", "max_backoff": "2s"},
}
DOC = private.REPO / "docs" / "reliability.md"
def markers(section: str) -> tuple[str, str]:
    return f"<!-- BEGIN {section} (scripts/reliability) -->", f"<!-- END {section} -->"


@dataclass
class Cell:
    source: str
    sink: str
    fault: str
    sent: int
    delivered: int = 0          # distinct sequence numbers that arrived
    lost: int = 0
    duplicated: int = 0
    foreign: int = 0
    seconds: float = 0.0
    recovered: float | None = None  # s from the fault's end to the next arrival
    rss_mib: float = 0.0            # natsconn's peak resident set (VmHWM)
    note: str = ""
    error: str | None = None
    expect_no_duplicates: bool = False

    @property
    def ok(self) -> bool:
        return (self.error is None and self.foreign == 0
                and (self.lost == 0 or self.source not in AT_LEAST_ONCE)
                and (self.duplicated == 0 or not self.expect_no_duplicates))

    @property
    def pair(self) -> str:
        return f"{SOURCES[self.source].label} → {SINKS[self.sink].label}"


@dataclass
class Run:
    """What a fault acts on: the running natsconn (replaced by ``kill``), the proxy,
    the sink leg, the pipeline file."""

    proc: NatsconnProcess
    proxy: TcpProxy
    sink: SinkLeg
    file: Path
    sent: int
    log: Callable[[str], None]
    extra_procs: list[NatsconnProcess] = field(default_factory=list)
    detour: Detour | None = None


async def _count(sink: SinkLeg) -> int | None:
    try:
        return await asyncio.wait_for(sink.count(), 20)
    except Exception:  # the server may be restarting
        return None


async def _wait_count(run: Run, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = await _count(run.sink) or count
        if count >= at_least:
            return count
        await asyncio.sleep(0.1)
    raise TimeoutError(f"only {count} of {at_least} messages arrived in {timeout:g}s")


# ---------------------------------------------------------------------- faults


async def fault_cut(run: Run) -> str:
    run.proxy.cut()
    progress = await _count(run.sink) or 0
    with contextlib.suppress(TimeoutError):
        await _wait_count(run, progress + run.sent // 5, 30)
    run.proxy.cut()
    return "2 cuts"


async def fault_restart(run: Run) -> str:
    seconds = await private.restart(run.sink.service)
    return f"{run.sink.service} restarted in {seconds:.1f}s"


async def fault_stall(run: Run) -> str:
    run.proxy.stall()
    await asyncio.sleep(STALL_SECONDS)
    run.proxy.resume()
    return f"stalled {STALL_SECONDS:g}s"


async def fault_kill(run: Run) -> str:
    at = await _count(run.sink) or 0
    run.proc.proc.send_signal(signal.SIGKILL)
    await run.proc.wait_exit(10)
    run.extra_procs.append(run.proc)
    run.proc = await NatsconnProcess.start(run.file, log_name=f"{run.file.stem}.after-kill.log",
                                           env={"NATSCONN_INSTANCE": "reliability"})
    await run.proc.wait_ready(90)
    return f"kill -9 at {at}/{run.sent} delivered"


async def fault_term(run: Run) -> str:
    at = await _count(run.sink) or 0
    run.proc.signal(signal.SIGTERM)
    code = await run.proc.wait_exit(60)
    run.extra_procs.append(run.proc)
    run.proc = await NatsconnProcess.start(run.file, log_name=f"{run.file.stem}.after-term.log",
                                           env={"NATSCONN_INSTANCE": "reliability"})
    await run.proc.wait_ready(90)
    return f"SIGTERM at {at}/{run.sent} delivered, exit {code}"


async def _degraded(run: Run, seconds: float) -> str:
    """Hold the fault the detour has on for ``seconds``, then heal the link."""
    assert run.detour is not None
    at = await _count(run.sink) or 0
    await asyncio.sleep(seconds)
    progress = (await _count(run.sink) or at) - at
    what, before = run.detour.fault, run.detour.dropped
    run.detour.heal()
    dropped = run.detour.dropped - before
    return (f"{what} for {seconds:g}s from {at}/{run.sent} ({progress} arrived meanwhile"
            + (f", {dropped} packets dropped)" if dropped else ")"))


async def fault_latency(run: Run) -> str:
    assert run.detour is not None
    run.detour.latency(0.05, 0.01)
    return await _degraded(run, NET_WINDOW)


async def fault_loss1(run: Run) -> str:
    assert run.detour is not None
    run.detour.loss(1)
    return await _degraded(run, NET_WINDOW)


async def fault_loss5(run: Run) -> str:
    assert run.detour is not None
    run.detour.loss(5)
    return await _degraded(run, NET_WINDOW)


async def fault_partition(run: Run) -> str:
    assert run.detour is not None
    run.detour.partition()
    return await _degraded(run, PARTITION_SECONDS)


async def fault_bandwidth(run: Run) -> str:
    assert run.detour is not None
    run.detour.bandwidth(10)
    return await _degraded(run, NET_WINDOW)


FAULT_FUNCS: dict[str, Callable[[Run], Awaitable[str]]] = {
    "cut": fault_cut, "restart": fault_restart, "stall": fault_stall, "kill": fault_kill,
    "term": fault_term, "latency": fault_latency, "loss1": fault_loss1,
    "loss5": fault_loss5, "partition": fault_partition, "bandwidth": fault_bandwidth}


def _fault_seconds(fault: str) -> float:
    return PARTITION_SECONDS if fault == "partition" else NET_WINDOW


async def _trickle(src: SourceLeg, first: int, n: int, seconds: float) -> None:
    """Put ``n`` more messages at the source, spread over ``seconds``."""
    if n <= 0:
        return
    ticks = max(1, int(seconds) - 1)
    done = 0
    for tick in range(ticks):
        share = n * (tick + 1) // ticks - done
        await src.produce(share, first + done)
        done += share
        await asyncio.sleep(1.0)


def _peak_rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------------- one cell


async def _settle(run: Run, timeout: float) -> float | None:
    """Until the sink holds every sequence number and stops changing (3 s), or has
    not changed for 30 s (something is stuck or lost), or ``timeout``. Returns the
    seconds until the first arrival (0 when everything had arrived already; None
    when nothing more came)."""
    started = deadline = time.monotonic()
    deadline += timeout
    first: float | None = None
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = await _count(run.sink)
        if count is not None and count != last:
            if last >= 0 and first is None:
                first = time.monotonic() - started
            last, since = count, time.monotonic()
        if first is None and last >= run.sent:
            first = 0.0
        quiet = time.monotonic() - since
        if last >= run.sent and quiet >= 3:
            seqs = await run.sink.seqs()
            if len(set(seqs)) >= run.sent:
                return first
        if quiet >= 30:
            return first
        await asyncio.sleep(0.1 if first is None else 0.5)
    return first


async def run_cell(source: str, sink: str, fault: str, n: int, workdir: Path,
                   log: Callable[[str], None] = print) -> Cell:
    scope = uuid.uuid4().hex[:8]
    cell = Cell(source, sink, fault, n, expect_no_duplicates=fault == "term" or (
        SINKS[sink].dedupes and SOURCES[source].gives_ids))
    src, dst = SOURCES[source](scope), SINKS[sink](scope)
    started = time.monotonic()
    detour: Detour | None = None
    if fault in NET_FAULTS:
        detour = await Detour(private.HOST, dst.port).start()
        proxy = await TcpProxy(*detour.entrance, delay=PACE_SECONDS).start()
    else:
        proxy = await TcpProxy(private.HOST, dst.port, delay=PACE_SECONDS).start()
    run: Run | None = None
    # A network fault lasts a while: a quarter of the messages is put at the source
    # before it, the rest trickles in while the link is degraded (the traffic meets
    # the fault), each second's share at once.
    head = n // 4 if fault in NET_FAULTS else n
    try:
        await src.produce(head)
        file = workdir / f"{source}-{sink}-{fault}-{scope}.yaml"
        file.write_text(yaml.safe_dump({
            "pipelines": [{"name": f"rel-{scope}", "source": src.options,
                           "sink": dst.options(proxy.address), **FLOW}],
            "shutdown_timeout": "20s", "restart_backoff": "500ms", "restart_backoff_max": "5s",
        }, sort_keys=False))
        proc = await NatsconnProcess.start(file, env={"NATSCONN_INSTANCE": "reliability"})
        run = Run(proc, proxy, dst, file, n, log, detour=detour)
        await proc.wait_ready(90)
        await _wait_count(run, max(1, min(n // 5, head // 2)), 120)
        feed = asyncio.create_task(_trickle(src, head, n - head, _fault_seconds(fault)))
        try:
            cell.note = await FAULT_FUNCS[fault](run)
        finally:
            await feed
        cell.recovered = await _settle(run, 240)
        cell.note += f"; {proxy.accepted} sink connections"
        cell.rss_mib = _peak_rss_mib(run.proc.proc.pid)
        run.proc.signal(signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            await run.proc.wait_exit(60)
        seqs = await dst.seqs()
        distinct = set(seqs)
        cell.delivered = len(distinct & set(range(n)))
        cell.lost = n - cell.delivered
        cell.duplicated = len(seqs) - len(distinct)
        cell.foreign = len(distinct - set(range(n)))
    except Exception as exc:
        cell.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if run is not None:
            for p in [run.proc, *run.extra_procs]:
                await p.kill()
        await proxy.close()
        if detour is not None:
            await detour.close()
        cell.seconds = time.monotonic() - started
        for leg in (src, dst):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(leg.cleanup(), 60)
    log(f"{cell.pair:<36} {fault:<8} sent {cell.sent} delivered {cell.delivered} lost "
        f"{cell.lost} duplicated {cell.duplicated} ({cell.seconds:.0f}s) "
        f"{'ok' if cell.ok else 'FAIL'} {cell.note}{' ' + cell.error if cell.error else ''}")
    return cell


# ---------------------------------------------------------------------- report


def table(cells: list[Cell]) -> str:
    rows = ["| pair | fault | sent | delivered | lost | duplicated | recovered | peak RSS | "
            "claim | verdict | what happened |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for c in cells:
        claim = "at least once" + (", no duplicates (graceful stop)" if c.fault == "term"
                                   else ", no duplicates (dedupe by id)"
                                   if c.expect_no_duplicates else "")
        if SINKS[c.sink].dedupes and not c.expect_no_duplicates:
            claim += " (source gives no ids: no dedupe)"
        what = c.note + (f"; error: {c.error}" if c.error else "")
        recovered = "—" if c.recovered is None else f"{c.recovered:.1f} s"
        rss = f"{c.rss_mib:.0f} MiB" if c.rss_mib else "—"
        rows.append(f"| {c.pair} | {c.fault} | {c.sent} | {c.delivered} | {c.lost} | "
                    f"{c.duplicated} | {recovered} | {rss} | {claim} | "
                    f"{'ok' if c.ok else '**FAIL**'} | {what} |")
    return "\n".join(rows)


def conditions(n: int, section: str = "fault-matrix") -> str:
    faults = (f"stall {STALL_SECONDS:g}s against a 5 s ack wait" if section == "fault-matrix"
              else f"each degraded link held {NET_WINDOW:g} s, the partition "
              f"{PARTITION_SECONDS:g} s, then healed; 'recovered' is the time from the "
              "healing to the next arrival at the sink")
    return (f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
            f"({platform.machine()}, Python {platform.python_version()}): {n} messages per "
            f"cell; batches of {FLOW['batch']['max_messages']}, max_in_flight "
            f"{FLOW['max_in_flight']}; the sink reached through a TCP proxy adding "
            f"{PACE_SECONDS * 1000:g} ms per forwarded chunk; {faults}; servers: the TLS/auth "
            "variants of `scripts/services start tls`.")


def section_of(cells: list[Cell]) -> str:
    return "network-matrix" if all(c.fault in NET_FAULTS for c in cells) else "fault-matrix"


def write_doc(cells: list[Cell], n: int, path: Path = DOC) -> None:
    """Replace the section the cells belong to (:func:`section_of`) in ``path``."""
    name = section_of(cells)
    begin, end = markers(name)
    section = f"{begin}\n\n{conditions(n, name)}\n\n{table(cells)}\n\n{end}"
    text = path.read_text() if path.exists() else f"# Reliability\n\n{begin}\n{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text += "\n" + section + "\n"
    path.write_text(text)


async def run_matrix(pairs: list[tuple[str, str]], faults: list[str], n: int, workdir: Path,
                     log: Callable[[str], None] = print) -> list[Cell]:
    private.check_running()
    cells = []
    for source, sink in pairs:
        for fault in faults:
            cells.append(await run_cell(source, sink, fault, n, workdir, log))
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/reliability", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  scripts/services start tls && scripts/reliability --write-doc\n"
               "  scripts/reliability --pairs jetstream:kafka --faults kill -n 1000")
    parser.add_argument("--pairs", default="all",
                        help="source:sink,... (default all: " +
                        ", ".join(f"{a}:{b}" for a, b in PAIRS) + ")")
    parser.add_argument("--faults", default=",".join(FAULTS), help="of " + ", ".join(FAULTS))
    parser.add_argument("-n", type=int, default=3000, help="messages per cell (default 3000)")
    parser.add_argument("--write-doc", action="store_true",
                        help=f"write the table into {DOC.relative_to(private.REPO)}")
    parser.add_argument("--json", help="also write the cells as JSON to this file")
    parser.add_argument("--workdir", default="/tmp/natsconn-reliability",
                        help="pipeline files and natsconn logs")
    args = parser.parse_args(argv)
    pairs = PAIRS if args.pairs == "all" else [
        (p.split(":")[0], p.split(":")[1]) for p in args.pairs.split(",")]
    unknown = [p for p in pairs if p not in PAIRS]
    faults = args.faults.split(",")
    if unknown or not set(faults) <= set(FAULTS):
        parser.error(f"unknown pair or fault: {unknown or faults}")
    # The test's own TLS clients: asyncio warns on every close ("returning true from
    # eof_received() has no effect when using ssl"), which buries the results.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cells = asyncio.run(run_matrix(pairs, faults, args.n, workdir))
    print("\n" + table(cells))
    if args.write_doc:
        write_doc(cells, args.n)
        print(f"\nwrote {DOC}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) | {"ok": c.ok} for c in cells],
                                              indent=2))
    bad = [c for c in cells if not c.ok]
    print(f"\n{len(cells) - len(bad)} of {len(cells)} cells hold the documented guarantees",
          file=sys.stderr)
    return 1 if bad else 0
