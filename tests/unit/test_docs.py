"""The docs: the generated reference is current, links resolve, the CLI helps.

The reference in docs/configuration.md (and the option tables in plugin pages)
is generated from schemas/ by ``python -m connector.docs_gen``; like
``natsconn schema --check``, a test fails when it falls behind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from connector import cli
from connector.docs_gen import (
    REFERENCE_MARKER,
    format_duration,
    format_size,
    load_schemas,
    option_rows,
    render,
    update,
)

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
SCHEMAS = REPO / "schemas"

DURATION = {"anyOf": [{"type": "number", "minimum": 0},
                      {"type": "string", "pattern": r"^\s*((\d+)\s*(us|µs|ms|s|m|h|d)\s*)+$"},
                      {"type": "string", "pattern": r"\$\{[^}]*\}"}]}
SIZE = {"anyOf": [{"type": "integer", "minimum": 0},
                  {"type": "string", "pattern": r"^\s*\d+\s*([kKmMgG][iI]?[bB]?|[bB])?\s*$"}]}


# ---------------------------------------------------------------- the committed docs


def test_generated_docs_are_current() -> None:
    stale = update(DOCS, SCHEMAS, check=True)
    assert stale == [], (
        f"stale generated docs: {[str(p.relative_to(REPO)) for p in stale]}; run "
        "`natsconn schema --only-package natsconn && python -m connector.docs_gen` and commit"
    )


def test_configuration_reference_covers_every_schema() -> None:
    text = (DOCS / "configuration.md").read_text()
    assert REFERENCE_MARKER in text
    head, generated = text.split(REFERENCE_MARKER)
    assert "## Environment variables" in head, "the hand-written intro is kept"
    for rel in load_schemas(SCHEMAS):
        if rel == "pipeline.schema.json":
            continue
        folder, name = rel.removesuffix(".json").split("/")
        kind = folder.removesuffix("s")
        assert f"### {kind}: {name}\n" in generated, f"no section for {rel}"
        assert f"](#{kind}-{name})" in generated, f"no index link to {rel}"


def test_reference_states_defaults_from_the_code() -> None:
    """Spot checks against values the engine and plugins really use."""
    generated = (DOCS / "configuration.md").read_text().split(REFERENCE_MARKER)[1]
    assert "| `pipelines[].batch.max_wait` | duration | `20ms` |" in generated
    assert "| `pipelines[].max_in_flight_bytes` | size | `64MiB` |" in generated
    assert "| `shutdown_timeout` | duration | `30s` |" in generated
    # a default_factory default (pydantic leaves these out unless asked)
    assert '| `servers` | list of string | `["nats://127.0.0.1:4222"]` |' in generated
    assert "| `tls.ca_file` | string | none |" in generated


_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = _FENCE.sub("", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in _HEADING.findall(text)}


def test_anchor_slugs() -> None:
    page = DOCS / "plugins" / "nats.md"
    assert "connection-options-all-four" in anchors(page)
    assert "jetstream-source" in anchors(page)  # from "## `jetstream` source"


@pytest.mark.parametrize("page", [REPO / "README.md", *sorted(DOCS.rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        missing_anchor = bool(anchor) and dest.suffix == ".md" and dest.exists() and (
            anchor not in anchors(dest))
        if not dest.exists() or missing_anchor:
            broken.append(target)
    assert broken == [], f"{page.relative_to(REPO)} has broken links: {broken}"


# ---------------------------------------------------------------- the generator


def _plugin(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"description": "A test plugin.", "type": "object",
            "properties": {"type": {"const": "x"}, **properties},
            "required": ["type", *(required or [])]}


def test_rows_show_types_defaults_and_groups() -> None:
    schema = _plugin({
        "stream": {"type": "string", "description": "the stream"},
        "wait": {**DURATION, "default": 0.02,
                 "description": "seconds, or a duration such as '50ms'"},
        "limit": {**SIZE, "default": 4 * 1024 * 1024, "description": "bytes per batch"},
        "password": {"anyOf": [{"type": "string", "format": "password"}, {"type": "null"}],
                     "default": None},
        "mode": {"enum": ["a", "b"], "type": "string", "default": "a"},
        "start": {"type": "string", "default": "0"},
        "subject": {"type": "string", "default": "{subject}", "description": "a | b"},
        "servers": {"type": "array", "items": {"type": "string"}, "default": ["n://h:1"]},
        "tls": {"anyOf": [{"type": "object", "properties": {
            "ca_file": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        }}, {"type": "null"}], "default": None},
    }, required=["stream"])
    rows = {r.name: r for r in option_rows(schema)}
    assert next(iter(rows)) == "stream", "required options come first"
    assert (rows["stream"].type, rows["stream"].default) == ("string", "**required**")
    assert (rows["wait"].type, rows["wait"].default, rows["wait"].description) == (
        "duration", "`20ms`", ""), "the generic duration text is left out"
    assert (rows["limit"].type, rows["limit"].default) == ("size", "`4MiB`")
    assert (rows["password"].type, rows["password"].default) == ("secret", "none")
    assert rows["mode"].type == "one of `a`, `b`"
    assert rows["start"].default == '`"0"`', "a string that YAML would read as a number"
    assert rows["subject"].default == '`"{subject}"`', "a string YAML needs quoted"
    assert rows["subject"].description == "a \\| b", "pipes must not split the table"
    assert rows["servers"].default == '`["n://h:1"]`'
    assert rows["tls"].type == "object"
    assert rows["tls.ca_file"].default == "none"
    assert "type" not in rows


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.02, "20ms"), (0.5, "500ms"), (1.5, "1.5s"), (30, "30s"), (60, "1m"),
    (90, "90s"), (300, "5m"), (3600, "1h"), (86400, "1d"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("size", "text"), [
    (1000, "1000"), (1024, "1KiB"), (65536, "64KiB"), (1048576, "1MiB"), (1536, "1536"),
])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_regions_are_filled_and_the_rest_kept() -> None:
    schemas = {"sources/x.json": _plugin({"n": {"type": "integer", "default": 3}})}
    page = ("# Page\n\nhand text\n\n<!-- BEGIN GENERATED: options sources/x -->\nold\n"
            "<!-- END GENERATED -->\n\nmore hand text\n")
    out = render(page, schemas)
    assert out.startswith("# Page\n\nhand text\n\n<!-- BEGIN GENERATED: options sources/x -->")
    assert out.endswith("<!-- END GENERATED -->\n\nmore hand text\n")
    assert "old" not in out
    assert "### source: x" in out and "| `n` | integer | `3` |" in out
    assert render(out, schemas) == out, "idempotent"


def test_region_naming_an_unknown_schema_fails() -> None:
    page = "<!-- BEGIN GENERATED: options sources/nope -->\n<!-- END GENERATED -->\n"
    with pytest.raises(SystemExit, match="sources/nope"):
        render(page, {}, "page.md")


def test_update_rewrites_only_stale_pages(tmp_path: Path) -> None:
    docs, schemas = tmp_path / "docs", tmp_path / "schemas"
    (schemas / "sources").mkdir(parents=True)
    (schemas / "sources" / "x.json").write_text(
        '{"description": "X.", "properties": {"n": {"type": "integer", "default": 3}}}')
    docs.mkdir()
    page = docs / "x.md"
    page.write_text("intro\n<!-- BEGIN GENERATED: options sources/x -->\n"
                    "<!-- END GENERATED -->\n")
    (docs / "other.md").write_text("no markers\n")
    assert update(docs, schemas, check=True) == [page]
    assert "<!-- END GENERATED -->\n" in page.read_text() and "`n`" not in page.read_text()
    assert update(docs, schemas) == [page]
    assert "| `n` | integer | `3` |" in page.read_text()
    assert update(docs, schemas, check=True) == []
    assert (docs / "other.md").read_text() == "no markers\n"


# ---------------------------------------------------------------- CLI help


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["schema"], ["plugins"],
                                     ["plugins", "show"]], ids=lambda c: " ".join(c) or "top")
def test_every_help_has_an_example(command: list[str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:\n  natsconn " + (command[0] if command else "") in out, out


def test_plugins_lists_package_version_and_description(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["jetstream"])
    assert line.split()[1:3] == ["natsconn", "0.1.0"]
    assert "JetStream durable pull consumer" in line


def test_plugins_show_prints_nested_options_and_readable_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["plugins", "show", "jetstream", "--kind", "source"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("source jetstream  (natsconn 0.1.0)")
    assert "  stream (required, string)\n      the stream to read" in out
    assert "  ack_wait = 30s  (duration)" in out
    assert '  servers = ["nats://127.0.0.1:4222"]  (list of string)' in out
    assert "  tls.ca_file = none  (string)" in out
    assert "  password = none  (secret)" in out


def test_plugins_show_unknown_name_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins", "show", "jetsream"]) == 2
    assert "jetstream" in capsys.readouterr().err
