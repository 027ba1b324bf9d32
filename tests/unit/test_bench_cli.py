"""The benchmark harness imports and its command line answers (nothing timed here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_help_names_the_run_command() -> None:
    result = _bench("run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--pairs" in result.stdout


def test_list_shows_the_nats_pairs_and_legs() -> None:
    result = _bench("list")
    assert result.returncode == 0, result.stderr
    for name in ("jetstream->nats", "nats->jetstream", "generate->drop",
                 "consume jetstream/pull", "produce jetstream/pipelined"):
        assert name in result.stdout
    assert "not loaded" not in result.stdout, result.stdout


def test_unknown_pair_is_a_clear_error() -> None:
    result = _bench("run", "--pairs", "jetstream:nowhere", "--no-start")
    assert result.returncode == 1
    assert "unknown pair 'jetstream->nowhere'" in result.stderr


def test_latency_and_stall_commands_answer_help() -> None:
    for command, option in (("latency", "--max-rate"), ("stall", "--seconds")):
        result = _bench(command, "--help")
        assert result.returncode == 0, result.stderr
        assert option in result.stdout and "--quick" in result.stdout


def test_latency_with_an_unknown_pair_is_a_clear_error() -> None:
    result = _bench("latency", "--pairs", "jetstream:nowhere", "--no-start")
    assert result.returncode == 1
    assert "unknown pair(s) jetstream->nowhere" in result.stderr


def test_bad_sizes_are_a_clear_error() -> None:
    result = _bench("run", "--sizes", "128,big", "--no-start", "--pairs", "generate:drop")
    assert result.returncode == 1
    assert "not a message size: 'big'" in result.stderr


def test_tree_that_is_not_a_checkout_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "connector").mkdir()
    result = _bench("run", "--pairs", "generate:drop", "--no-start", "--tree", str(tmp_path))
    assert result.returncode == 1
    assert f"--tree {tmp_path}: expected a natsconn checkout, found no plugins/" in result.stderr


def test_tree_puts_the_other_checkout_first_for_natsconn_only(tmp_path: Path) -> None:
    from bench.runner import Harness, Options

    (tmp_path / "connector").mkdir()
    (tmp_path / "bench").mkdir()  # a checkout's own harness: not the one to run
    harness = Harness(Options(pairs=[], sizes=[128], tree=tmp_path))
    measured = harness._child_env(natsconn=True)["PYTHONPATH"].split(":")
    shim = Path(measured[0])
    assert measured[1:3] == [str(tmp_path / "plugins"), str(REPO)]
    assert (shim / "connector").resolve() == (tmp_path / "connector").resolve()
    assert sorted(p.name for p in shim.iterdir()) == ["connector"]  # bench/ is REPO's
    assert harness._child_env(natsconn=True)["PYTHONPATH"] == ":".join(measured)  # reused
    assert REPO not in shim.parents  # mypy and ruff must not follow it
    (shim / "connector").unlink()
    shim.rmdir()
    legs = harness._child_env()["PYTHONPATH"].split(":")
    assert str(tmp_path) not in legs and legs[0] == str(REPO)
    # the engine's worker must not put this tree's directory ahead of PYTHONPATH
    assert harness._worker_argv({"mode": "engine"})[1] == "-P"
    assert "-P" not in harness._worker_argv({"mode": "consume"})
    assert "-P" not in Harness(Options(pairs=[], sizes=[128]))._worker_argv({"mode": "engine"})
