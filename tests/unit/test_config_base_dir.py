"""A relative file path in a plugin's options is the pipeline file's folder's
(``info.context["base_dir"]``), so a file validates from any working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector import ConfigError
from connector.config import load_file

SCHEMA = '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "string"}]}'


def _write(folder: Path, schema_file: str) -> Path:
    (folder / "schemas").mkdir(exist_ok=True)
    (folder / "schemas" / "r.avsc").write_text(SCHEMA)
    path = folder / "p.yaml"
    path.write_text("pipelines:\n"
                    "  - name: p\n"
                    "    source: {type: generate, count: 1}\n"
                    "    transforms:\n"
                    f"      - {{type: encode, format: avro, schema_file: {schema_file}}}\n"
                    "    sink: {type: drop}\n")
    return path


def test_a_schema_file_beside_the_pipeline_file_is_found_from_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "schemas/r.avsc")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_file(os.path.relpath(path, elsewhere))
    config = loaded.pipelines[0].transforms[0].config
    assert Path(config.schema_file).resolve() == (tmp_path / "schemas" / "r.avsc").resolve()  # type: ignore[attr-defined]


def test_a_missing_schema_file_is_still_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "schemas/nope.avsc")
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert caught.value.line == 5 and "nope.avsc" in caught.value.message
