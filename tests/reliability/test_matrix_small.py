"""The fault matrix's code in CI: one fault (a connection cut mid-batch) on two
pairs (JetStream -> JetStream, which deduplicates, and JetStream -> Redis
stream, which does not), with few messages. The full matrix (every pair, every
fault) is run by hand with scripts/reliability; its table is in
docs/reliability.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from .matrix import run_cell, table, write_doc
from .private import check_running

pytestmark = pytest.mark.integration

N = 600


@pytest.fixture
def servers() -> None:
    try:
        check_running()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.mark.parametrize("pair", [("jetstream", "jetstream"), ("jetstream", "redis_stream")])
async def test_cut_mid_batch(servers: None, pair: tuple[str, str], tmp_path: Path) -> None:
    lines: list[str] = []
    cell = await run_cell(*pair, "cut", N, tmp_path, lines.append)
    assert cell.error is None, lines
    assert cell.sent == N and cell.lost == 0, lines
    assert cell.ok, lines
    if cell.expect_no_duplicates:
        assert cell.duplicated == 0, lines
    # the proxy really cut: natsconn had to connect to the sink again
    assert "sink connections" in cell.note and not cell.note.endswith("; 1 sink connections")
    # and the report machinery renders it
    doc = tmp_path / "reliability.md"
    write_doc([cell], N, doc)
    text = doc.read_text()
    assert table([cell]).splitlines()[-1] in text and "| cut | 600 | 600 | 0 |" in text
