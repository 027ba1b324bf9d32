"""The kit as a third-party plugin package uses it: its own pytest project with
``asyncio_mode = "auto"``, natsconn's fixtures loaded by the pytest11 entry
point, async fixtures and an async ``make_source`` factory.

Runs pytest in a subprocess in a temporary project (against core NATS, the
quickest suite) and checks what it reports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PYPROJECT = """\
[project]
name = "natsconn-thirdparty-example"
version = "0"

[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
"""

TEST_MODULE = '''\
from collections.abc import AsyncIterator

import nats
import pytest

from connector import Message
from connector.testing.kit import SourceSuite
from connector.testing.servers import host_port
from natsconn_nats.source import NatsSource


class TestTheirSource(SourceSuite):
    at_least_once = False

    @pytest.fixture
    def server_address(self, nats_url):
        host, port = host_port("nats", nats_url)
        return f"{host}:{port}"

    @pytest.fixture
    async def make_source(self, server_address, unique):
        async def make(address=None):  # an async factory is fine too
            return NatsSource.make_test_instance(
                servers=[f"nats://{address or server_address}"],
                subjects=[f"third.{unique}.>"])
        return make

    @pytest.fixture
    async def produce(self, nats_url, unique) -> AsyncIterator[object]:
        nc = await nats.connect(nats_url)

        async def produce(messages: list[Message]) -> None:
            for m in messages:
                await nc.publish(f"third.{unique}.x", m.data, headers=dict(m.headers) or None)
            await nc.flush()

        yield produce
        await nc.close()
'''


def test_a_third_party_project_runs_the_kit(tmp_path: Path, nats_url: str) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_their_source.py").write_text(TEST_MODULE)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         "--rootdir", str(tmp_path), "-c", str(tmp_path / "pyproject.toml"), "tests"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={"NATS_URL": nats_url, "PATH": "/usr/bin:/bin"},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    # open/close, empty read, round trip and reconnect run; the four
    # acknowledgement tests do not apply to an at-most-once source and are
    # deselected by natsconn's pytest plugin, which the project loaded by itself.
    assert re.search(r"\b4 passed, 4 deselected\b", summary), out
