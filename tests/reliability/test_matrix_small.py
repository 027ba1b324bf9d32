"""The fault matrix's code in CI: one fault (a connection cut mid-batch) on two
pairs (JetStream -> JetStream, which deduplicates, and JetStream -> Redis
stream, which does not), with few messages; and two network faults through a
namespace of the test's own (a partition and 5 % packet loss), shortened. The
full matrix (every pair, every fault) is run by hand with scripts/reliability;
its tables are in docs/reliability.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import matrix
from .matrix import run_cell, section_of, table, write_doc
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


async def test_partition_holds_the_flow_then_it_recovers(
        servers: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matrix, "PARTITION_SECONDS", 8.0)
    lines: list[str] = []
    cell = await run_cell("jetstream", "redis_stream", "partition", N, tmp_path, lines.append)
    assert cell.error is None, lines
    assert cell.lost == 0 and cell.delivered == N, lines
    # the kernel really dropped everything for the whole window: nothing arrived,
    # while three quarters of the messages were still to come
    at = int(cell.note.split(" from ", 1)[1].split("/", 1)[0])
    assert at < N * 3 // 4 and f"/{N} (0 arrived meanwhile" in cell.note, lines
    assert "packets dropped" in cell.note, lines
    assert cell.recovered is not None and cell.rss_mib > 0, lines
    assert section_of([cell]) == "network-matrix"


async def test_packet_loss_loses_no_message(
        servers: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matrix, "NET_WINDOW", 8.0)
    lines: list[str] = []
    cell = await run_cell("jetstream", "jetstream", "loss5", N, tmp_path, lines.append)
    assert cell.error is None, lines
    assert cell.ok and cell.lost == 0 and cell.duplicated == 0, lines
    assert "5% loss for 8s from " in cell.note and "packets dropped" in cell.note, lines
    arrived = int(cell.note.split("(", 1)[1].split(" arrived", 1)[0])
    assert arrived > 0, lines  # the flow went on through the lossy link
    doc = tmp_path / "reliability.md"
    doc.write_text("# R\n\n<!-- BEGIN fault-matrix (scripts/reliability) -->\nkept\n"
                   "<!-- END fault-matrix -->\n")
    write_doc([cell], N, doc)
    text = doc.read_text()
    assert "kept" in text and "<!-- BEGIN network-matrix (scripts/reliability) -->" in text
    assert "| loss5 | 600 | 600 | 0 | 0 |" in text
