"""Fuzzing the config loader: whatever the text, loading gives a LoadedFile or a
ConfigError that names the file and a line within it, never another exception.

Four kinds of input: any Unicode text; YAML documents built from the loader's
own vocabulary (so that validation, interpolation and units are reached, not
just the YAML parser); small edits of the shipped example files; and raw bytes
through ``load_file``. Example counts are bounded (``max_examples``) so the
suite stays fast; nothing here talks to a server.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector import ConfigError
from connector.config.loader import LoadedFile, load_file, load_text
from connector.registry import Registry

REGISTRY = Registry()
EXAMPLES = sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml"))
# Beside the examples, so that paths relative to the file (schemas/order.avsc) resolve.
FILE = str(Path(__file__).resolve().parents[2] / "examples" / "fuzz.yaml")
ENV = {"SET": "value", "NUM": "42", "EMPTY": ""}

SETTINGS = settings(max_examples=200, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow])


def check(text: str) -> LoadedFile | ConfigError:
    """Load ``text``; the only exception allowed is a located ConfigError."""
    try:
        return load_text(text, FILE, REGISTRY, ENV)
    except ConfigError as exc:
        assert exc.file == FILE, f"error without the file: {exc!r}"
        assert exc.line is not None, f"error without a line: {exc.render()}"
        lines = max(1, text.count("\n") + 1)
        assert 1 <= exc.line <= lines + 1, f"line {exc.line} of a {lines}-line text: {exc}"
        assert exc.message, "an empty message"
        assert "Traceback" not in exc.render()
        return exc


# ------------------------------------------------------------------ any text


@SETTINGS
@given(st.text(max_size=400))
def test_any_text(text: str) -> None:
    check(text)


@SETTINGS
@given(st.lists(st.sampled_from([
    "pipelines:", "  - name: p", "    source:", "      type: generate", "    sink:",
    "      type: drop", "      type: jetstream", "    batch: {max_messages: 0}", "- x", "  -",
    "{", "}", "[", "]", ":", "&a", "*a", "<<: *a", "!!python/object:os.system", "%YAML 1.1",
    "---", "...", "\t", "key: ${VAR}", "key: ${file:/nonexistent}", "key: $${x}", "'", '"',
    "max_wait: 1fortnight", "max_bytes: 1ZiB", "http: {address: x}", "log: {level: loud}",
]), max_size=25))
def test_yaml_fragments(lines: list[str]) -> None:
    check("\n".join(lines))


# ------------------------------------------------------------------ structured YAML

_KEYS = ["pipelines", "name", "source", "sink", "transforms", "dead_letter", "type", "batch",
         "max_messages", "max_bytes", "max_wait", "max_in_flight", "max_in_flight_bytes",
         "retry", "max_attempts", "initial_backoff", "max_backoff", "http", "address",
         "enabled", "log", "format", "level", "shutdown_timeout", "restart_backoff",
         "stream", "subject", "subjects", "servers", "topic", "topics", "key", "table", "url",
         "dsn", "password", "token", "count", "rate", "size", "tls", "ca_file", "durable",
         "ack_wait", "bootstrap_servers", "security_protocol", "headers", "columns",
         "in_progress_interval", "unknown"]
_TYPES = ["generate", "drop", "nats", "jetstream", "kafka", "redis_stream", "redis_list",
          "redis_pubsub", "redis_kv", "postgres", "postgres_outbox", "postgres_notify",
          "map_subject", "json_validate", "webhook", "nope"]
_STRINGS = ["", "x", "orders.>", "{subject}", "{subject[1]}", "{subject[99]}", "{header[X]}",
            "{", "}", "{nope}", "${SET}", "${UNSET}", "${UNSET:-d}", "${EMPTY:-d}", "${NUM}",
            "${file:/nonexistent/secret}", "${file:}", "$${SET}", "${", "${ BAD }", "1MiB",
            "1.5GB", "-1KiB", "50ms", "1h", "0s", "-5s", "nan", "inf", "1e309", "ten",
            "nats://u:p@h:4222", "127.0.0.1:9092", "redis://h/99", "postgresql://h/db",
            "SASL_SSL", "json", "debug", "é", "\u0000", "\ud7ff", "a" * 300]
_scalars = st.one_of(
    st.sampled_from(_STRINGS), st.sampled_from(_TYPES), st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70), st.booleans(), st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=8)), inner,
                        max_size=5),
    ),
    max_leaves=25,
)


@st.composite
def _plugin(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"type": draw(st.sampled_from(_TYPES))}
    out.update(draw(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=4)))
    return out


@st.composite
def _document(draw: st.DrawFn) -> Any:
    pipeline: dict[str, Any] = {
        "name": draw(st.one_of(st.just("p"), st.text(max_size=12), _scalars)),
        "source": draw(_plugin()), "sink": draw(_plugin()),
    }
    extra = draw(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=3))
    pipeline.update(extra)
    doc: dict[str, Any] = {"pipelines": draw(st.one_of(
        st.just([pipeline]), st.just([pipeline, dict(pipeline)]), _values))}
    doc.update(draw(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=3)))
    return draw(st.one_of(st.just(doc), _values))


def _dump(doc: Any) -> str:
    def fix(value: Any) -> Any:  # YAML cannot write NaN keys; floats stay as they are
        if isinstance(value, dict):
            return {str(k): fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return yaml.safe_dump(fix(doc), allow_unicode=True, sort_keys=False)


@SETTINGS
@given(_document())
def test_structured_documents(doc: Any) -> None:
    check(_dump(doc))


# ------------------------------------------------------------------ edited examples


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_load_as_they_are(example: Path) -> None:
    """The unedited examples are the baseline of the edits below."""
    result = check(example.read_text())
    assert isinstance(result, LoadedFile), result


@st.composite
def _edited(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(EXAMPLES)).read_text()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate-line"]))
        piece = draw(st.sampled_from([":", "-", " ", "\n", "  ", "{", "[", "'", '"', "#", "*",
                                      "&", "!", "%", "${", "}", "0", "x", "\t", "é"]))
        if op == "insert":
            text = text[:at] + piece + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 10)):]
        elif op == "replace":
            text = text[:at] + piece + text[at + 1:]
        else:
            lines = text.split("\n")
            i = min(at % max(1, len(lines)), len(lines) - 1)
            lines.insert(i, lines[i])
            text = "\n".join(lines)
    return text


@SETTINGS
@given(_edited())
def test_edited_examples(text: str) -> None:
    check(text)


# ------------------------------------------------------------------ bytes


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_through_load_file(tmp_path_factory: pytest.TempPathFactory,
                                     data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "bytes.yaml"
    path.write_bytes(data)
    try:
        load_file(path, REGISTRY, ENV)
    except ConfigError as exc:
        assert exc.file == str(path), exc
        assert exc.message


def test_float_edge_values_are_config_errors() -> None:
    """Values the strategies above reach only by chance, spelled out."""
    for value in (math.nan, math.inf, -math.inf, 1e309, -(2**70)):
        text = _dump({"pipelines": [{"name": "p", "source": {"type": "generate"},
                                      "sink": {"type": "drop"},
                                      "batch": {"max_messages": value}}]})
        assert isinstance(check(text), ConfigError)
