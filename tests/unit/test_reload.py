"""Hot reload in-process with fake plugins: the plan, and a supervisor applying it
(unchanged pipelines keep their Pipeline object, changed ones restart with the new
config, removed ones stop, added ones start, an invalid file changes nothing)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml

from connector.config import load_text
from connector.engine.reload import Reloader, plan
from connector.engine.supervisor import Supervisor
from connector.ops.control import table
from connector.ops.openapi import document
from connector.ops.status import History, pipeline_status, redact

from ._fakes import REGISTRY, until

DOCS = Path(__file__).resolve().parents[2] / "docs"


def spec(name: str, **source: Any) -> dict[str, Any]:
    return {"name": name, "source": {"type": "fake", "per_read": 5, "pause": "5ms", **source},
            "sink": {"type": "fake"}, "in_progress_interval": 0}


def text(*pipelines: dict[str, Any], **top: Any) -> str:
    return yaml.safe_dump({"pipelines": list(pipelines), "http": {"enabled": False}, **top},
                          sort_keys=False)


def loader(files: dict[str, str]) -> Any:
    return lambda path: load_text(files[path], path, REGISTRY, env={})


def test_plan_matches_by_name_and_compares_the_whole_config() -> None:
    old = load_text(text(spec("a"), spec("b"), spec("c")), "f", REGISTRY, env={})
    new = load_text(text(spec("a"), spec("b", key="other"), spec("d")), "f", REGISTRY, env={})
    p = plan(old, new)
    assert (p.unchanged, p.changed, p.removed, p.added) == (("a",), ("b",), ("c",), ("d",))
    same = plan(old, load_text(text(spec("a"), spec("b"), spec("c")), "f", REGISTRY, env={}))
    assert same.changed == () and same.unchanged == ("a", "b", "c")


async def test_a_reload_changes_only_what_changed() -> None:
    files = {"p.yaml": text(spec("keep"), spec("change"), spec("drop"))}
    sup = Supervisor(loader(files)("p.yaml"))
    reloader = Reloader(sup, "p.yaml", load=loader(files))
    run = asyncio.create_task(sup.run())
    try:
        await until(lambda: sup.ready()[0] and len(sup.records) == 3)
        kept = sup.records["keep"].current
        changing = sup.records["change"].current
        files["p.yaml"] = text(spec("keep"), spec("change", key="new"), spec("add"))
        outcome = await reloader.reload()
        assert outcome.ok and outcome.plan is not None
        assert outcome.as_json()["changed"] == ["change"]
        await until(lambda: set(sup.records) == {"keep", "change", "add"} and sup.ready()[0]
                    and sup.records["change"].current is not changing)
        assert sup.records["keep"].current is kept, "the untouched pipeline was replaced"
        assert sup.records["keep"].reloads == 0 and sup.records["change"].reloads == 1
        assert sup.records["change"].config.spec.source.options()["key"] == "new"
        assert kept is not None and kept.state.value == "running"
    finally:
        sup.stop(2)
        await asyncio.wait_for(run, 10)


async def test_an_invalid_file_changes_nothing_and_says_where() -> None:
    files = {"p.yaml": text(spec("keep"))}
    sup = Supervisor(loader(files)("p.yaml"))
    reloader = Reloader(sup, "p.yaml", load=loader(files))
    run = asyncio.create_task(sup.run())
    try:
        await until(lambda: sup.ready()[0])
        before = sup.records["keep"].current
        files["p.yaml"] = text(spec("keep"), {"name": "bad", "source": {"type": "nope"},
                                              "sink": {"type": "fake"}})
        outcome = await reloader.reload()
        assert not outcome.ok
        assert outcome.error is not None and outcome.error.startswith("p.yaml:")
        assert "unknown source type 'nope'" in outcome.error
        assert list(sup.records) == ["keep"] and sup.records["keep"].current is before
        assert reloader.last is outcome
    finally:
        sup.stop(2)
        await asyncio.wait_for(run, 10)


async def test_process_settings_are_reported_as_needing_a_restart() -> None:
    files = {"p.yaml": text(spec("a"))}
    sup = Supervisor(loader(files)("p.yaml"))
    reloader = Reloader(sup, "p.yaml", load=loader(files))
    files["p.yaml"] = text(spec("a"), shutdown_timeout="5s")
    outcome = await reloader.reload()
    assert outcome.ok and outcome.restart_needed_for == ("shutdown_timeout",)
    assert sup.loaded.spec.shutdown_timeout == 30.0, "applied only at the next start"


def test_status_hides_secrets_in_the_effective_config() -> None:
    cfg = {"source": {"type": "jetstream", "password": "hunter2", "servers": ["nats://x"]},
           "sink": {"type": "kafka", "sasl": {"password": "p", "username": "u"}},
           "token_file": None}
    out = redact(cfg)
    assert out["source"]["password"] == "***" and out["sink"]["sasl"]["password"] == "***"
    assert out["sink"]["sasl"]["username"] == "u" and out["token_file"] is None


async def test_status_rates_and_history_come_from_the_counters() -> None:
    files = {"p.yaml": text(spec("a"))}
    sup = Supervisor(loader(files)("p.yaml"))
    history = History()
    history.take(sup, now=100.0)
    rec = sup.records["a"]
    from connector.ops.metrics import MESSAGES_OUT
    MESSAGES_OUT.labels("a").inc(40)
    history.take(sup, now=102.0)
    status = pipeline_status("a", rec, history)
    assert status["rates"]["written_per_second"] == 20.0
    assert status["history"] == [[102.0, 0.0, 20.0]]
    assert status["state"] == "starting" and status["last_error"] is None
    line = table([status]).splitlines()[1]
    assert line.split()[:2] == ["a", "starting"] and "20/s" in line


def test_the_openapi_document_in_docs_is_current() -> None:
    assert json.loads((DOCS / "openapi.json").read_text()) == document(), (
        "docs/openapi.json is stale: python -c 'import json; from connector.ops.openapi "
        "import document; print(json.dumps(document(), indent=2))' > docs/openapi.json")
