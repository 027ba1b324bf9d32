"""The pipeline-file loader: structure, interpolation, secrets, and every error's
file, line, YAML path and expected/found wording."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr, field_validator

from connector import ConfigError, PluginConfig, Source
from connector.config import LoadedFile, load_file, load_text
from connector.registry import Registry

from ._fakes import FakeSink, FakeSource

REPO = Path(__file__).resolve().parents[2]
BROKEN = REPO / "examples" / "broken"


def load(text: str, env: dict[str, str] | None = None, file: str = "pipeline.yaml",
         registry: Registry | None = None) -> LoadedFile:
    return load_text(textwrap.dedent(text), file, registry, env if env is not None else {})


def error(text: str, env: dict[str, str] | None = None,
          registry: Registry | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, env, registry=registry)
    return info.value


MINIMAL = """\
    pipelines:
      - name: smoke
        source: {type: generate, count: 10}
        sink: {type: drop}
"""


# ------------------------------------------------------------------ valid files


def test_minimal_file_gets_safe_defaults() -> None:
    loaded = load(MINIMAL)
    assert loaded.file == "pipeline.yaml"
    [p] = loaded.pipelines
    assert p.spec.name == "smoke"
    assert (p.source.kind, p.source.name, p.source.cls.__name__) == (
        "source", "generate", "GenerateSource")
    assert p.source.config.count == 10  # type: ignore[attr-defined]
    assert (p.sink.name, p.sink.cls.__name__) == ("drop", "DropSink")
    assert p.transforms == () and p.dead_letter is None
    assert p.spec.batch.max_messages == 1000
    assert p.spec.batch.max_bytes == 4 * 1024 * 1024
    assert p.spec.batch.max_wait == pytest.approx(0.02)
    assert p.spec.max_in_flight == 4
    assert p.spec.retry.max_attempts is None  # retry for ever: nothing leaves unwritten
    assert loaded.spec.shutdown_timeout == 30.0
    assert loaded.secrets == set()


def test_full_pipeline_with_transforms_dead_letter_and_human_units() -> None:
    loaded = load("""\
        pipelines:
          - name: orders
            source: {type: jetstream, stream: ORDERS, durable: d, ack_wait: 1m30s}
            transforms:
              - {type: json_validate, require: [id]}
              - {type: map_subject, subject: "archive.{subject[1]}"}
            sink: {type: nats, subject: "copy.{subject}"}
            dead_letter: {type: nats, subject: dlq.orders}
            batch: {max_messages: 500, max_bytes: 1MiB, max_wait: 50ms}
            max_in_flight_bytes: 64KiB
            retry: {max_attempts: 5, initial_backoff: 10ms}
        shutdown_timeout: 5s
        http: {address: "127.0.0.1:0"}
    """)
    [p] = loaded.pipelines
    assert p.source.config.ack_wait == 90.0  # type: ignore[attr-defined]
    assert [t.name for t in p.transforms] == ["json_validate", "map_subject"]
    assert p.dead_letter is not None and p.dead_letter.name == "nats"
    assert p.spec.batch.max_bytes == 1024 * 1024
    assert p.spec.batch.max_wait == pytest.approx(0.05)
    assert p.spec.max_in_flight_bytes == 65536
    assert p.spec.retry.max_attempts == 5
    assert loaded.spec.shutdown_timeout == 5.0
    assert loaded.spec.http.address == "127.0.0.1:0"


def test_load_file_reads_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(MINIMAL))
    loaded = load_file(path, env={})
    assert loaded.file == str(path)
    assert [p.spec.name for p in loaded.pipelines] == ["smoke"]


def test_load_file_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_file(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_test_registry_serves_fake_plugins() -> None:
    registry = Registry.make_test_instance({"source": {"fake": FakeSource},
                                            "sink": {"fake": FakeSink}})
    loaded = load("""\
        pipelines:
          - {name: a, source: {type: fake, key: k}, sink: {type: fake}}
    """, registry=registry)
    assert loaded.pipelines[0].source.cls is FakeSource
    assert loaded.pipelines[0].source.config.key == "k"  # type: ignore[attr-defined]
    err = error("pipelines:\n  - {name: a, source: {type: generate}, sink: {type: fake}}\n",
                registry=registry)
    assert "unknown source type 'generate'" in err.message
    assert "fake" in err.message


# ----------------------------------------------------------------- interpolation


def test_variables_defaults_and_escapes() -> None:
    loaded = load("""\
        pipelines:
          - name: ${NAME}
            source:
              type: generate
              count: ${COUNT:-7}
              subject: "$${not.a.var}.${TOKEN:-x}"
              headers: {Empty: "${EMPTY:-fallback}", Set: "${EMPTY}"}
            sink: {type: drop, delay: "${DELAY:-5ms}"}
            batch: {max_wait: "${WAIT:-20}"}
    """, env={"NAME": "from-env", "EMPTY": ""})
    [p] = loaded.pipelines
    cfg = p.source.config
    assert p.spec.name == "from-env"
    assert cfg.count == 7  # type: ignore[attr-defined]
    assert cfg.subject == "${not.a.var}.x"  # type: ignore[attr-defined]
    # ${X:-d} uses the default when X is unset or empty; ${X} keeps an empty value.
    assert cfg.headers == {"Empty": "fallback", "Set": ""}  # type: ignore[attr-defined]
    assert p.sink.config.delay == pytest.approx(0.005)  # type: ignore[attr-defined]
    assert p.spec.batch.max_wait == 20.0  # a plain number from a variable means seconds


def test_variable_set_in_env_beats_default() -> None:
    loaded = load(MINIMAL.replace("count: 10", 'count: "${N:-10}"'), env={"N": "3"})
    assert loaded.pipelines[0].source.config.count == 3  # type: ignore[attr-defined]


def test_secret_from_file_is_read_and_recorded(tmp_path: Path) -> None:
    secret = tmp_path / "nats-password"
    secret.write_text("s3cret-from-file\n")
    loaded = load(f"""\
        pipelines:
          - name: a
            source: {{type: generate}}
            sink:
              type: nats
              user: bridge
              password: ${{file:{secret}}}
    """)
    password = loaded.pipelines[0].sink.config.password  # type: ignore[attr-defined]
    assert isinstance(password, SecretStr)
    assert password.get_secret_value() == "s3cret-from-file"  # one trailing newline dropped
    assert "s3cret-from-file" in loaded.secrets
    assert "s3cret-from-file" not in repr(loaded.pipelines[0].sink.config)


def test_secret_fields_and_url_passwords_are_recorded() -> None:
    loaded = load("""\
        pipelines:
          - name: a
            source: {type: generate}
            sink:
              type: nats
              servers: ["nats://bridge:url-pass-123@127.0.0.1:4222"]
              token: tok-456789
    """)
    assert {"tok-456789", "url-pass-123"} <= loaded.secrets


def test_unreadable_secret_file_points_at_the_line(tmp_path: Path) -> None:
    err = error(f"""\
        pipelines:
          - name: a
            source: {{type: generate}}
            sink:
              type: nats
              password: ${{file:{tmp_path}/missing}}
    """)
    assert err.line == 6
    assert err.path == "pipelines[0].sink.password"
    assert "cannot read secret file" in err.message


def test_bad_reference_is_an_error() -> None:
    err = error(MINIMAL.replace("count: 10", 'count: "${1BAD}"'))
    assert err.line == 3
    assert "expected a variable reference" in err.message
    assert "found ${1BAD}" in err.message


def test_file_secret_never_shows_in_an_error_about_its_field(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-hunter2")
    err = error(f"""\
        pipelines:
          - name: a
            source: {{type: generate}}
            sink:
              type: nats
              servers: ${{file:{secret}}}
    """)
    assert err.line == 6
    assert "expected a valid list" in err.message
    assert "hunter2-hunter2" not in str(err)


def test_secret_field_value_never_shows_in_its_type_error() -> None:
    err = error("""\
        pipelines:
          - name: a
            source: {type: generate}
            sink: {type: nats, password: 987654321987}
    """)
    assert err.path == "pipelines[0].sink.password"
    assert "987654321987" not in str(err)
    assert "expected a valid string" in err.message


# ------------------------------------------------------------ the broken examples

# file -> (line, YAML path or None, words the message must contain)
EXPRESSION_COLUMNS = {"expression-syntax.yaml": 50, "expression-variable.yaml": 16,
                      "expression-type.yaml": 27}
BROKEN_CASES: dict[str, tuple[int, str | None, list[str]]] = {
    "bad-yaml.yaml": (8, None, ["invalid YAML", "mapping values are not allowed", "expected"]),
    "unknown-type.yaml": (5, "pipelines[0].source.type", [
        "unknown source type 'jetsream'", "did you mean 'jetstream'?", "expected an installed",
        "generate", "nats"]),
    "missing-field.yaml": (4, "pipelines[0].source.stream", [
        "required field 'stream' is missing", "expected", "found", "jetstream"]),
    "wrong-type.yaml": (6, "pipelines[0].max_in_flight", [
        "expected a valid integer", "found 'four'"]),
    "undefined-variable.yaml": (8, "pipelines[0].sink.servers[0]", [
        "undefined variable NATSCONN_EXAMPLE_UNSET_URL", "expected", "found neither",
        "${NATSCONN_EXAMPLE_UNSET_URL:-value}"]),
    "unknown-key.yaml": (7, "pipelines[0].sink.delai", [
        "unknown key 'delai'", "expected one of: delay", "sink plugin 'drop'"]),
    "duplicate-key.yaml": (6, "pipelines[0]", [
        "duplicate key", "expected each key once", "found 'sink' again", "first at line 5"]),
    "duplicate-pipeline.yaml": (7, "pipelines[1].name", [
        "expected a unique pipeline name", "found 'orders' again", "first at line 3"]),
    "empty.yaml": (1, None, ["empty", "expected a mapping with 'pipelines:'", "found nothing"]),
    # CEL expressions: the line, and the column of the fault in the file (EXPRESSION_COLUMNS).
    "expression-syntax.yaml": (6, "pipelines[0].transforms[0].when", [
        "invalid CEL expression 'data.amount > 10 &&'", "Syntax error", "filter"]),
    "expression-variable.yaml": (7, "pipelines[0].sinks[0].when", [
        "undeclared reference to 'amount'", "expected one of the message variables: data"]),
    "expression-type.yaml": (7, "pipelines[0].transforms[0].subject", [
        "no matching overload for '_+_' applied to '(string, int)'", "mapping"]),
    "secret-wrong-type.yaml": (10, "pipelines[0].sink.servers", [
        "expected a valid list", "found 'nats://127.0.0.1:4222'"]),
}


def test_every_broken_example_has_a_case() -> None:
    assert sorted(p.name for p in BROKEN.glob("*.yaml")) == sorted(BROKEN_CASES)


@pytest.mark.parametrize("name", sorted(BROKEN_CASES))
def test_broken_example_error_names_file_line_path_expected_found(name: str) -> None:
    line, path, words = BROKEN_CASES[name]
    file = BROKEN / name
    with pytest.raises(ConfigError) as info:
        load_file(file, env={})
    err = info.value
    text = str(err)
    assert err.file == str(file)
    assert err.line == line, text
    assert err.column == EXPRESSION_COLUMNS.get(name), text
    where = f"{line}:{err.column}" if err.column is not None else f"{line}"
    assert text.startswith(f"{file}:{where}: "), text
    assert err.path == path, text
    if path is not None:
        assert f": {path}: " in text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    assert "\n" not in text


# --------------------------------------------------------- more broken structure


@pytest.mark.parametrize(("text", "line", "path", "words"), [
    ("- a\n- b\n", 1, None, ["expected a mapping with 'pipelines:'", "found list"]),
    ("http: {enabled: false}\n", 1, "pipelines", ["required field 'pipelines' is missing"]),
    ("pipelines: []\n", 1, "pipelines", ["expected at least 1 item", "found an empty list"]),
    ("pipelines: {name: a}\n", 1, "pipelines", ["expected a valid list", "found a mapping"]),
    ("pipelines:\n  - name: a\n    source: generate\n    sink: {type: drop}\n", 3,
     "pipelines[0].source", ["expected a valid dictionary", "found 'generate'"]),
    ("pipelines:\n  - name: a\n    source: {count: 3}\n    sink: {type: drop}\n", 3,
     "pipelines[0].source.type", ["required field 'type' is missing"]),
    ("pipelines:\n  - name: a b\n    source: {type: generate}\n    sink: {type: drop}\n", 2,
     "pipelines[0].name", ["expected a string to match pattern", "found 'a b'"]),
    ("pipelines:\n  - name: a\n    source: {type: generate}\n    sink: {type: drop}\n"
     "    batch:\n      max_messages: 0\n", 6, "pipelines[0].batch.max_messages",
     ["expected greater than or equal to 1", "found 0"]),
    ("pipelines:\n  - name: a\n    source: {type: generate}\n    sink: {type: drop}\n"
     "    batch: {max_wait: soon}\n", 5, "pipelines[0].batch.max_wait",
     ["expected a duration", "found 'soon'"]),
    ("pipelines:\n  - name: a\n    source: {type: generate}\n    sink: {type: drop}\n"
     "    transforms:\n      - {type: map_subjet, subject: x}\n", 6,
     "pipelines[0].transforms[0].type", ["unknown transform type", "did you mean 'map_subject'"]),
    ("pipelines:\n  - name: a\n    source: {type: generate}\n    sink: {type: drop}\n"
     "http: {address: localhost}\n", 5, "http.address", ["expected host:port",
                                                        "found 'localhost'"]),
    ("pipelines:\n  - name: a\n    source: {type: generate\n    sink: {type: drop}\n", 4, None,
     ["invalid YAML", "found ':'", "flow mapping that starts at line 3"]),
    ("pipelines:\n  - name: a\n    source: {type: generate, count: ${N}}\n", 3, None,
     ["invalid YAML", "write a ${VAR} reference in quotes"]),
])
def test_structural_errors(text: str, line: int, path: str | None, words: list[str]) -> None:
    err = error(text)
    assert err.file == "pipeline.yaml"
    assert err.line == line, str(err)
    assert err.path == path, str(err)
    for word in words:
        assert word in err.message, f"{word!r} not in {err.message!r}"


class _CheckedConfig(PluginConfig):
    stream: str

    @field_validator("stream")
    @classmethod
    def _upper(cls, value: str) -> str:
        if value != value.upper():
            raise ValueError(f"expected an upper-case stream name, found {value!r}")
        return value


class _CheckedSource(Source[_CheckedConfig]):
    Config = _CheckedConfig

    async def read_batch(self, max_messages: int, max_wait: float) -> None:
        return None


def test_plugin_validator_message_is_kept_with_line_and_plugin() -> None:
    registry = Registry.make_test_instance({"source": {"checked": _CheckedSource},
                                            "sink": {"fake": FakeSink}})
    err = error("""\
        pipelines:
          - name: a
            source:
              type: checked
              stream: orders
            sink: {type: fake}
    """, registry=registry)
    assert err.line == 5
    assert err.path == "pipelines[0].source.stream"
    assert "expected an upper-case stream name, found 'orders'" in err.message
    assert "source plugin 'checked' in pipeline 'a'" in err.message
