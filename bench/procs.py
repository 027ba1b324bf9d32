"""Child processes and CPU accounting from /proc (no psutil).

Every measured thing runs in its own process: a raw leg in a worker, a
pipeline in ``natsconn run``. CPU inside a timed window comes from
``/proc/<pid>/stat`` (clock ticks), peak RSS from ``VmHWM``, and a child's
whole-life CPU from ``os.wait4``. ``CpuMeter`` estimates how much CPU the rest
of the machine used meanwhile (other helpers' tests share the 2 cores), so a
noisy figure can be recognised and run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int, children: bool = False) -> float:
    """user+sys seconds of a live process (raises OSError once it is gone); with
    ``children``, plus those of the children it has waited for (cutime, cstime)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime (fields 16, 17)
    return ticks / TICK


def proc_runq_wait(pid: int) -> float:
    """Seconds the threads of a live process have spent runnable but waiting for a
    core (the second field of each /proc/PID/task/TID/schedstat, in ns), summed."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def renice(pid: int, nice: int) -> None:
    """Set the scheduling priority of every thread of a live process (Linux's
    ``setpriority(PRIO_PROCESS, tid)`` applies to one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def proc_hwm(pid: int) -> int:
    """Peak resident set of a live process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_busy() -> float:
    """CPU seconds spent busy by all cores since boot."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICK


def find_pids(comm: str) -> list[int]:
    """Pids whose command name is ``comm`` (e.g. nats-server)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == comm:
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _cpu_or_none(pid: int, children: bool = False) -> float | None:
    try:
        return proc_cpu(pid, children)
    except (OSError, ValueError, IndexError):
        return None


def children_of(pid: int) -> list[int]:
    """Live children of ``pid`` (``/proc/<pid>/task/<tid>/children``, every thread)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def descendants(root: int, children: Callable[[int], list[int]]) -> list[int]:
    """``root`` and every process below it, parents before children (each once,
    even if ``children`` reports a pid twice)."""
    seen = {root}
    order = [root]
    i = 0
    while i < len(order):
        for kid in children(order[i]):
            if kid not in seen:
                seen.add(kid)
                order.append(kid)
        i += 1
    return order


def env_value(environ: bytes, key: str) -> str | None:
    """One variable of a ``/proc/<pid>/environ`` (NUL-separated ``KEY=value``)."""
    prefix = key.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def tree_total(cpu: dict[str, float]) -> float:
    """CPU of a process tree from each live member's own + reaped children's CPU
    (``proc_cpu(pid, children=True)``): a worker that exited and was reaped is in
    its parent's ``cutime``, a live one only in its own figure, so none counts twice."""
    return sum(cpu.values())


WORKER_ENV = "NATSCONN_WORKER_INDEX"  # set by `natsconn run --workers N` in each worker


class ProcTree:
    """CPU, per member and in total, of a process and its descendants (``natsconn
    run --workers N``: the parent and its workers). The tree is rescanned at most
    every ``rescan`` seconds; the total is held at its highest, so a worker that
    dies between two readings (its CPU moving to the parent's ``cutime`` only
    once reaped) cannot make it go backwards."""

    def __init__(self, root: int, rescan: float = 0.25) -> None:
        self.root = root
        self.rescan = rescan
        self._pids: list[int] = [root]
        self._labels: dict[int, str] = {root: "parent"}
        self._scanned = 0.0
        self._best = 0.0
        self.last_parts: dict[str, float] = {}

    def _scan(self) -> None:
        self._pids = descendants(self.root, children_of)
        for pid in self._pids:
            if pid in self._labels:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    index = env_value(f.read(), WORKER_ENV)
            except OSError:
                index = None
            # Only a worker label is kept: a child caught between fork and exec
            # still shows its parent's environment, so "no index" is read again
            # at the next scan instead of labelling a worker ``pid N`` for good.
            if index is not None:
                self._labels[pid] = f"w{index}"
        self._scanned = time.monotonic()

    def parts(self) -> dict[str, float]:
        """CPU seconds of each live member by label (``parent``, ``w0``, ``w1``…); a
        worker restarted under the same index adds to its label."""
        if time.monotonic() - self._scanned >= self.rescan:
            self._scan()
        out: dict[str, float] = {}
        for pid in self._pids:
            cpu = _cpu_or_none(pid, children=True)
            if cpu is not None:
                label = self._labels.get(pid, f"pid {pid}")
                out[label] = out.get(label, 0.0) + cpu
        return out

    def cpu(self) -> float:
        """Total CPU seconds of the tree; :attr:`last_parts` holds the reading's parts."""
        self.last_parts = self.parts()
        self._best = max(self._best, tree_total(self.last_parts))
        return self._best

    def hwm(self) -> int:
        """Sum of the live members' peak resident sets."""
        total = 0
        for pid in self._pids:
            with contextlib.suppress(OSError):
                total += proc_hwm(pid)
        return total


class ServerCpu:
    """CPU the server processes named ``names`` (``/proc/<pid>/comm``) used since
    :meth:`start`: never negative, never decreasing.

    Server process sets change under a measurement: PostgreSQL forks a backend
    per connection (natsconn's and the raw legs' come and go), and a server
    may be restarted by another helper. Each process counts its own CPU plus
    that of its children it has reaped (``cutime``/``cstime``): a backend that
    exits moves its CPU into the postmaster's count, so it is neither lost nor
    counted twice. Pids are rescanned at most every ``rescan`` seconds; a
    server that vanished (restarted) lowers the sum, which is held at its
    highest instead of going negative.
    """

    def __init__(self, names: list[str], rescan: float = 0.25) -> None:
        self.names = sorted(set(names))
        self.rescan = rescan
        self._pids: list[int] = []
        self._scanned = 0.0
        self._base = 0.0
        self._best = 0.0

    def _scan(self) -> None:
        self._pids = [pid for name in self.names for pid in find_pids(name)]
        self._scanned = time.monotonic()

    def _total(self) -> float:
        return sum(cpu for pid in self._pids
                   if (cpu := _cpu_or_none(pid, children=True)) is not None)

    def start(self) -> None:
        self._scan()
        self._base = self._total()
        self._best = 0.0

    def since_start(self) -> float:
        if time.monotonic() - self._scanned >= self.rescan:
            self._scan()
        self._best = max(self._best, self._total() - self._base)
        return self._best


@dataclass(slots=True)
class CpuMeter:
    """Machine busy time minus what we account for, over one measurement.

    ``servers`` are the command names of the service processes the
    measurement talks to (their CPU is part of the work, not foreign load);
    the harness itself and the children it reaped are accounted for too.
    """

    servers: ServerCpu
    t0: float = 0.0
    busy0: float = 0.0
    own0: float = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = machine_busy()
        self.own0 = time.process_time()
        self.servers.start()

    def server_since_start(self) -> float:
        """CPU seconds the servers used since ``start``."""
        return self.servers.since_start()

    def other_cores(self, children_cpu: float) -> float:
        wall = time.monotonic() - self.t0
        if wall <= 0:
            return 0.0
        own = (time.process_time() - self.own0) + self.servers.since_start()
        foreign = (machine_busy() - self.busy0) - own - children_cpu
        return max(0.0, foreign / wall)

    def server_cpu(self) -> float:
        """Same as :meth:`server_since_start` (kept for callers that difference it)."""
        return self.servers.since_start()


class Child:
    """A subprocess whose stdout we read by lines and which we reap with wait4."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None, tree: bool = False) -> None:
        self.argv = argv
        # stderr to a file: a chatty child must never block on a full pipe
        self._stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (lives with the child)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._stderr_file, env=env, cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.cpu_total = 0.0  # set by reap()
        self.maxrss = 0  # bytes, set by reap()
        self.returncode: int | None = None
        self.stderr = b""
        self._cpu_seen = 0.0
        # tree: CPU and RSS of the child and its descendants (natsconn run --workers N)
        self.tree = ProcTree(self.pid) if tree else None
        self._parts_seen: dict[str, float] = {}

    async def readline(self, timeout: float) -> str | None:
        """The next stdout line, or None at end of file."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        return line.decode().rstrip("\n") if line else None

    def cpu(self) -> float:
        """Live CPU seconds (the last reading once the process is gone)."""
        if self.tree is not None:
            if self.returncode is None:
                self._cpu_seen = max(self._cpu_seen, self.tree.cpu())
            return self._cpu_seen
        cpu = _cpu_or_none(self.pid) if self.returncode is None else None
        if cpu is not None:
            self._cpu_seen = cpu
        return self._cpu_seen

    def parts(self) -> dict[str, float]:
        """CPU seconds by member of the tree (``parent``, ``w0``…) at the last
        :meth:`cpu` reading; ``{}`` without ``tree``."""
        if self.tree is not None and self.returncode is None:
            self._parts_seen = dict(self.tree.last_parts)
        return dict(self._parts_seen)

    def runq_wait(self) -> float:
        """Seconds the child's threads have waited for a core (0 once it is gone)."""
        if self.returncode is not None:
            return 0.0
        try:
            return proc_runq_wait(self.pid)
        except OSError:
            return 0.0

    def hwm(self) -> int:
        if self.tree is not None:
            return self.tree.hwm()
        try:
            return proc_hwm(self.pid)
        except OSError:
            return 0

    def alive(self) -> bool:
        """Still running? Never reaps (``WNOWAIT``): :meth:`reap` must get the
        child's rusage, and a reaped pid would make its ``wait4`` fail (ECHILD)."""
        if self.returncode is not None:
            return False
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def terminate(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)

    async def reap(self, timeout: float = 30.0) -> int:
        """Wait for exit (SIGKILL after ``timeout``); record whole-life CPU and RSS and
        the child's stderr. Never raises for a child already reaped elsewhere: its
        stderr (often the traceback that explains a failure) still comes back."""
        deadline = time.monotonic() + timeout
        usage = None
        try:
            while True:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)  # noqa: ASYNC222
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, signal.SIGKILL)
                    deadline = time.monotonic() + 10
                await asyncio.sleep(0.02)
        except ChildProcessError:  # reaped by someone else: no rusage left to read
            usage = None
            self.returncode = self.proc.returncode if self.proc.returncode is not None else -1
        self.proc.returncode = self.returncode  # so Popen does not reap it again
        if usage is not None:
            self.cpu_total = usage.ru_utime + usage.ru_stime
            self.maxrss = usage.ru_maxrss * 1024
        else:
            self.cpu_total = self._cpu_seen
        if not self._stderr_file.closed:
            self._stderr_file.seek(0)
            self.stderr = self._stderr_file.read()
            self._stderr_file.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.returncode

    def stderr_tail(self, limit: int = 3000) -> str:
        """The end of the child's stderr (after :meth:`reap`), for error messages."""
        return self.stderr.decode(errors="replace")[-limit:]

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
