"""``python -m bench profile PAIR``: where natsconn spends its CPU in one pipeline run.

Runs the pair once as ``bench run`` does, attaches py-spy to ``natsconn run``
once it is ready, stops it when the far side has every message, and prints
the shares of sampled CPU by component, by function (self) and by function
including callees. The raw stacks are kept for flame graphs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

# First matching path fragment names the component a frame's file belongs to.
COMPONENTS = [  # plugin packages first: "natsconn_redis/" also contains "redis/"
    ("natsconn_nats/", "natsconn NATS plugins"),
    ("natsconn_kafka/", "natsconn Kafka plugins"),
    ("natsconn_redis/", "natsconn Redis plugins"),
    ("natsconn_postgres/", "natsconn PostgreSQL plugins"),
    ("natsconn_dev/", "natsconn dev plugins"),
    ("nats/aio/", "nats-py client"),
    ("nats/js/", "nats-py jetstream"),
    ("nats/protocol/", "nats-py protocol"),
    ("aiokafka/", "aiokafka"),
    ("redis/", "redis-py"),
    ("hiredis", "hiredis"),
    ("asyncpg/", "asyncpg"),
    ("connector/engine/", "natsconn engine"),
    ("connector/ops/", "natsconn metrics/ops"),
    ("connector/", "natsconn SDK"),
    ("prometheus_client/", "prometheus-client"),
    ("asyncio/", "asyncio"),
    ("uvloop/", "uvloop"),
]


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise FileNotFoundError("py-spy is not installed: .venv/bin/pip install py-spy "
                                "(it is in the dev extra)")
    return exe


class Recorder:
    """py-spy attached to a live process, writing collapsed stacks."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--format", "raw", "--function",
             "--rate", str(rate), "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _parse(line: str) -> tuple[list[str], int] | None:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    return stack.split(";"), int(count)


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/plugins/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def component(frame: str) -> str:
    for fragment, name in COMPONENTS:
        if fragment in frame:
            return name
    return "other (stdlib, builtins)"


def summarise(path: Path, top: int = 25) -> str:
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_component: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        parsed = _parse(line)
        if parsed is None:
            continue
        frames, count = parsed
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        own[_short(leaf)] += count
        # Attribute the sample to the innermost frame that has a known component,
        # so time in builtins called from nats-py counts for nats-py.
        comp = "other (stdlib, builtins)"
        for frame in reversed(frames):
            c = component(frame)
            if not c.startswith("other"):
                comp = c
                break
        by_component[comp] += count
        for f in {_short(f) for f in frames}:
            inclusive[f] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples of natsconn's CPU", "", "by component (innermost known frame):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in by_component.most_common()]
    lines += ["", f"top {top} functions, self time:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", f"top {top} functions, including callees:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)
