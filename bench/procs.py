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
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """user+sys seconds of a live process (raises OSError once it is gone)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


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


def _cpu_or_zero(pid: int) -> float:
    try:
        return proc_cpu(pid)
    except OSError:
        return 0.0


@dataclass(slots=True)
class CpuMeter:
    """Machine busy time minus what we account for, over one measurement.

    ``servers`` are the service processes the measurement talks to (their CPU
    is part of the work, not foreign load); the harness itself and the
    children it reaped are accounted for too.
    """

    servers: list[int]
    t0: float = 0.0
    busy0: float = 0.0
    own0: float = 0.0
    server0: float = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = machine_busy()
        self.own0 = self._own()
        self.server0 = self.server_cpu()

    def server_since_start(self) -> float:
        """CPU seconds the servers used since ``start``."""
        return self.server_cpu() - self.server0

    def _own(self) -> float:
        return time.process_time() + sum(_cpu_or_zero(p) for p in self.servers)

    def other_cores(self, children_cpu: float) -> float:
        wall = time.monotonic() - self.t0
        if wall <= 0:
            return 0.0
        foreign = (machine_busy() - self.busy0) - (self._own() - self.own0) - children_cpu
        return max(0.0, foreign / wall)

    def server_cpu(self) -> float:
        return sum(_cpu_or_zero(p) for p in self.servers)


class Child:
    """A subprocess whose stdout we read by lines and which we reap with wait4."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
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

    async def readline(self, timeout: float) -> str | None:
        """The next stdout line, or None at end of file."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        return line.decode().rstrip("\n") if line else None

    def cpu(self) -> float:
        return _cpu_or_zero(self.pid)

    def hwm(self) -> int:
        try:
            return proc_hwm(self.pid)
        except OSError:
            return 0

    def alive(self) -> bool:
        return self.returncode is None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)

    async def reap(self, timeout: float = 30.0) -> int:
        """Wait for exit (SIGKILL after ``timeout``); record whole-life CPU and RSS."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG)
            if pid == self.pid:
                break
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            await asyncio.sleep(0.02)
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # so Popen does not reap it again
        self.cpu_total = usage.ru_utime + usage.ru_stime
        self.maxrss = usage.ru_maxrss * 1024
        self._stderr_file.seek(0)
        self.stderr = self._stderr_file.read()
        self._stderr_file.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.returncode

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
