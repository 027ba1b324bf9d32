"""JSON Schemas: schemas/ is current, and pipeline.schema.json agrees with the loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from connector.registry import Registry
from connector.schema import write_schemas

from .test_config import BROKEN, REPO

NATSCONN = Path(sys.executable).with_name("natsconn")
SCHEMAS = REPO / "schemas"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "pipeline.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [e.message for e in validator.iter_errors(doc)]


def test_repo_schemas_are_current() -> None:
    result = subprocess.run(
        [str(NATSCONN), "schema", "--check", "--only-package", "natsconn"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, (
        f"{result.stderr}\nschemas/ is stale: run `natsconn schema --only-package natsconn` "
        "and commit schemas/"
    )
    assert "up to date" in result.stdout


def test_check_reports_changed_missing_and_extra_files(tmp_path: Path) -> None:
    registry = Registry()
    written = write_schemas(tmp_path, registry, package="natsconn")
    assert "pipeline.schema.json" in written
    assert write_schemas(tmp_path, registry, check=True, package="natsconn") == []
    (tmp_path / "sources" / "generate.json").write_text("{}\n")
    (tmp_path / "sinks" / "drop.json").unlink()
    (tmp_path / "sinks" / "gone.json").write_text("{}\n")
    stale = write_schemas(tmp_path, registry, check=True, package="natsconn")
    assert sorted(stale) == ["sinks/drop.json", "sinks/gone.json", "sources/generate.json"]
    assert (tmp_path / "sinks" / "gone.json").exists(), "--check must not write"
    write_schemas(tmp_path, registry, package="natsconn")
    assert not (tmp_path / "sinks" / "gone.json").exists()
    assert write_schemas(tmp_path, registry, check=True, package="natsconn") == []


def test_every_plugin_has_a_schema_file() -> None:
    registry = Registry()
    folders = {"source": "sources", "sink": "sinks", "transform": "transforms"}
    for kind, folder in folders.items():
        for info in registry.infos(kind):  # type: ignore[arg-type]
            if info.package == "natsconn":
                assert (SCHEMAS / folder / f"{info.name}.json").exists(), (kind, info.name)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_schema_accepts_the_examples(validator: jsonschema.protocols.Validator,
                                     example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    assert errors(validator, doc) == []


def test_schema_accepts_references_in_scalar_fields(
        validator: jsonschema.protocols.Validator) -> None:
    doc = {"pipelines": [{
        "name": "${NAME:-orders}",
        "source": {"type": "generate", "count": "${COUNT:-100}", "size": 64},
        "sink": {"type": "nats", "password": "${file:/run/secrets/nats}",
                 "connect_timeout": "${TIMEOUT}"},
        "batch": {"max_wait": "${WAIT:-20ms}", "max_messages": "${N}"},
        "max_in_flight": "${IN_FLIGHT:-4}",
    }], "shutdown_timeout": "10s"}
    assert errors(validator, doc) == []


MINIMAL: dict[str, Any] = {"pipelines": [
    {"name": "a", "source": {"type": "generate"}, "sink": {"type": "drop"}},
]}


@pytest.mark.parametrize(("where", "change"), [
    ("pipeline", {"max_in_flight": "four"}),
    ("pipeline", {"max_inflight": 4}),
    ("pipeline", {"batch": {"max_wait": "soon"}}),
    ("pipeline", {"batch": {"max_bytes": "lots"}}),
    ("pipeline", {"name": "has space"}),
    ("pipeline", {"source": {"type": "jetsream", "stream": "S"}}),
    ("pipeline", {"source": {"type": "jetstream"}}),  # stream is required
    ("pipeline", {"sink": {"type": "drop", "delai": "5ms"}}),
    ("pipeline", {"source": {"type": "generate", "count": -1}}),
    ("top", {"http": {"enabled": "maybe"}}),
    ("top", {"pipelines": []}),
])
def test_schema_rejects_wrong_files(validator: jsonschema.protocols.Validator, where: str,
                                    change: dict[str, Any]) -> None:
    doc = json.loads(json.dumps(MINIMAL))
    target = doc["pipelines"][0] if where == "pipeline" else doc
    target.update(change)
    assert errors(validator, doc), f"schema accepted {change}"
    assert errors(validator, MINIMAL) == []


@pytest.mark.parametrize("name", ["wrong-type.yaml", "unknown-key.yaml", "missing-field.yaml",
                                  "unknown-type.yaml"])
def test_schema_rejects_the_broken_examples(validator: jsonschema.protocols.Validator,
                                            name: str) -> None:
    doc = yaml.safe_load((BROKEN / name).read_text())
    assert errors(validator, doc)
