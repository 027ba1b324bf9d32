"""A nats-server of the test's own, for settings the shared one must not have
(a small ``max_payload``): JetStream in a temporary directory, a free port,
stopped (and its store removed with ``tmp_path``) at the end.

The binary is the one ``scripts/services install nats`` builds into
``$NATSCONN_BIN_DIR`` (``~/.cache/natsconn/bin`` by default), else
``nats-server`` on ``PATH``. Not finding one fails the test: a test that did
not run proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path


def nats_server_binary() -> str:
    bin_dir = os.environ.get("NATSCONN_BIN_DIR") or str(
        Path.home() / ".cache" / "natsconn" / "bin")
    candidate = Path(bin_dir) / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise AssertionError(f"no nats-server in {bin_dir} or on PATH; run "
                         "`scripts/services install nats`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _prepare(directory: Path, max_payload: str) -> tuple[int, Path, Path]:
    """(port, config file, log file) of a server in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = directory / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"max_payload: {max_payload}\n"
        f"jetstream {{\n  store_dir: \"{directory / 'jetstream'}\"\n"
        "  max_memory_store: 64MB\n  max_file_store: 8GB\n}\n", encoding="utf-8")
    return port, conf, directory / "nats.log"


@contextlib.asynccontextmanager
async def dedicated_nats_server(directory: Path, max_payload: str = "1MB",
                                timeout: float = 20.0) -> AsyncIterator[str]:
    """Yield the ``nats://`` URL of a fresh nats-server with JetStream."""
    port, conf, log_path = _prepare(directory, max_payload)
    async with nats_server_from(conf, port, log_path, "dedicated", timeout) as url:
        yield url


@contextlib.asynccontextmanager
async def nats_server_from(conf: Path, port: int, log_path: Path, what: str,
                           timeout: float = 20.0) -> AsyncIterator[str]:
    """Run nats-server with ``conf`` (listening on ``port``) until the block ends;
    yield its ``nats://`` URL once it accepts connections."""
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            nats_server_binary(), "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while not _accepts(port):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{what} nats-server did not start (exit {proc.returncode}); log:\n"
                    + log_path.read_text(errors="replace")[-2000:])  # noqa: ASYNC240
            await asyncio.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
