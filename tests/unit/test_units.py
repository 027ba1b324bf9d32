"""Human durations and sizes, as plain functions and as pydantic field types."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from connector import ByteSize, Duration, PluginConfig, parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [
    ("50ms", 0.05),
    ("1.5s", 1.5),
    ("1m30s", 90.0),
    ("1h2m", 3720.0),
    ("5m", 300.0),
    ("2h", 7200.0),
    ("1d", 86400.0),
    ("250us", 0.00025),
    (" 30s ", 30.0),
    ("10", 10.0),        # plain seconds as text, e.g. from ${TIMEOUT:-10}
    ("0.25", 0.25),
    (2, 2.0),
    (0.5, 0.5),
    (0, 0.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", [
    "", "abc", "-1s", "1s2", "5 parsecs", "1.s", "ms", -1, -0.5, True, None, [1],
    math.nan, math.inf,
])
def test_bad_durations_say_what_was_expected_and_found(bad: object) -> None:
    with pytest.raises(ValueError, match=r"expected .*duration") as info:
        parse_duration(bad)
    assert "found" in str(info.value)


@pytest.mark.parametrize(("text", "size"), [
    ("1MiB", 1024 * 1024),
    ("64KiB", 64 * 1024),
    ("10MB", 10_000_000),
    ("1kb", 1000),
    ("1GiB", 1024**3),
    ("1 GiB", 1024**3),
    ("1.5KiB", 1536),
    ("100b", 100),
    ("1024", 1024),
    (4096, 4096),
    (0, 0),
])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "x", "-1", "1e3", "1 parsec", "MiB", 1.5, -1, True, None])
def test_bad_sizes_say_what_was_expected_and_found(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a size") as info:
        parse_size(bad)
    assert "found" in str(info.value)


class _Options(PluginConfig):
    wait: Duration = 1.0
    limit: ByteSize = 1


def test_annotated_types_validate_in_models() -> None:
    opts = _Options.model_validate({"wait": "20ms", "limit": "64KiB"})
    assert opts.wait == pytest.approx(0.02)
    assert opts.limit == 65536
    with pytest.raises(ValidationError, match="expected a duration"):
        _Options.model_validate({"wait": "soon"})
    with pytest.raises(ValidationError, match="expected a size"):
        _Options.model_validate({"limit": "big"})


def test_json_schema_patterns_accept_what_the_parsers_accept() -> None:
    import re

    props = _Options.model_json_schema()["properties"]
    duration = next(s["pattern"] for s in props["wait"]["anyOf"] if s["type"] == "string")
    size = next(s["pattern"] for s in props["limit"]["anyOf"] if s["type"] == "string")
    for text in ["50ms", "1m30s", "10", "0.5", " 30s "]:
        assert re.match(duration, text), text
    for text in ["abc", "-1s", ""]:
        assert not re.match(duration, text), text
    for text in ["1MiB", "64KiB", "10MB", "1024", "1MIB", "100b"]:
        assert re.match(size, text), text
    for text in ["x", "-1", "1e3"]:
        assert not re.match(size, text), text
