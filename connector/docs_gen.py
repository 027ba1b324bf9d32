"""Markdown reference tables generated from the JSON Schemas in ``schemas/``.

``docs/configuration.md`` is a hand-written introduction, a marker line, and
below it the generated reference: the file's own settings, then every
plugin's options. Any other page may hold a generated region::

    <!-- BEGIN GENERATED: options sources/nats sinks/nats -->
    ...replaced on each run...
    <!-- END GENERATED -->

which receives the option tables of the named schema files. Everything
outside the markers is left alone.

    python -m connector.docs_gen            # rewrite the generated parts
    python -m connector.docs_gen --check    # exit 1 if any of them is stale

The input is the committed ``schemas/`` (``natsconn schema --only-package
natsconn`` writes it), so the docs describe exactly what editors validate
against, and a test fails when either one falls behind the code.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REFERENCE_MARKER = "<!-- GENERATED BELOW by `python -m connector.docs_gen`; do not edit by hand -->"
_REGION = re.compile(
    r"(?P<begin><!-- BEGIN GENERATED: options (?P<names>[^>]*?) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- END GENERATED -->)",
    re.DOTALL,
)
_KINDS = (("sources", "source"), ("sinks", "sink"), ("transforms", "transform"))
# Branches added by connector.schema so that any scalar may be a ${VAR} reference.
_REFERENCE_PATTERN = r"\$\{[^}]*\}"
_GENERIC_DESCRIPTIONS = (
    "seconds, or a duration such as",
    "bytes, or a size such as",
)
_YAML_SPECIAL = re.compile(r"""^$|^[\s\-?:,\[\]{}#&*!|>'"%@`]|[{}\[\]#:,]|\s$""")


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    type: str
    default: str
    description: str


# ------------------------------------------------------------------ schema reading


def _branches(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives of a property, without the ${VAR} and null ones."""
    out: list[dict[str, Any]] = []
    for key in ("anyOf", "oneOf"):
        if key in node:
            for sub in node[key]:
                out.extend(_branches(sub))
            return out
    if node.get("pattern") == _REFERENCE_PATTERN or node.get("type") == "null":
        return []
    return [node]


def _is_duration(branches: list[dict[str, Any]]) -> bool:
    return any("ms|s|m" in str(b.get("pattern", "")) for b in branches)


def _is_size(branches: list[dict[str, Any]]) -> bool:
    return any("[kKmMgG]" in str(b.get("pattern", "")) for b in branches)


def _nested(node: dict[str, Any]) -> dict[str, Any] | None:
    """The object schema of an option group (``tls``, ``ssl``, ``batch``), if any."""
    for b in _branches(node):
        if isinstance(b.get("properties"), dict) and "oneOf" not in node:
            return b
    return None


def _range(b: dict[str, Any]) -> str:
    low, high = b.get("minimum", b.get("exclusiveMinimum")), b.get("maximum")
    if low is not None and high is not None:
        return f" {low}..{high}"
    if low is not None:
        return f" ≥ {low}" if "minimum" in b else f" > {low}"
    if high is not None:
        return f" ≤ {high}"
    return ""


def _type_of(node: dict[str, Any]) -> str:
    branches = _branches(node)
    if _is_duration(branches):
        return "duration"
    if _is_size(branches):
        return "size"
    names: list[str] = []
    for b in branches:
        name = _branch_type(b)
        if name not in names:
            names.append(name)
    return " or ".join(names) if names else "any"


def _branch_type(b: dict[str, Any]) -> str:
    if "const" in b:
        return f"`{b['const']}`"
    if "enum" in b:
        return "one of " + ", ".join(f"`{v}`" for v in b["enum"])
    kind = b.get("type")
    if kind == "string" and b.get("format") == "password":
        return "secret"
    if kind == "array":
        items = b.get("items", {})
        return f"list of {_type_of(items) if items else 'any'}"
    if kind == "object" or "properties" in b:
        extra = b.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"map of string to {_type_of(extra)}"
        return "object"
    if kind in ("integer", "number"):
        return f"{kind}{_range(b)}"
    if kind == "string" and b.get("format") == "uri":
        return "URL"
    if kind == "string" and "pattern" in b:
        return f"string matching `{b['pattern']}`"
    if isinstance(kind, str):
        return kind
    return "any"


# ------------------------------------------------------------------ value display


def format_duration(seconds: float) -> str:
    """``0.02`` → ``20ms``, ``30.0`` → ``30s``, ``300`` → ``5m``, ``1.5`` → ``1.5s``."""
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    ms = seconds * 1000
    if ms == int(ms) and seconds < 1:
        return f"{int(ms)}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """``4194304`` → ``4MiB``, ``65536`` → ``64KiB``, ``1000`` → ``1000``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _scalar(value: Any) -> str:
    """A value as it would be written in a pipeline file."""
    if isinstance(value, str):
        plain = not _YAML_SPECIAL.search(value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)


def _default(node: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in node:
        return "—"
    value = node["default"]
    if value is None:
        return "none"
    branches = _branches(node)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if _is_duration(branches):
            return f"`{format_duration(float(value))}`"
        if _is_size(branches) and isinstance(value, int):
            return f"`{format_size(value)}`"
    if isinstance(value, dict) and _nested(node) is not None:
        return "see below" if value else "`{}`"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value, ensure_ascii=False, separators=(', ', ': '))}`"
    return f"`{_scalar(value)}`"


def _description(node: dict[str, Any], type_name: str) -> str:
    text = " ".join(str(node.get("description", "")).split())
    if type_name in ("duration", "size") and text.startswith(_GENERIC_DESCRIPTIONS):
        return ""
    return text.replace("``", "`").replace("|", "\\|")


# ------------------------------------------------------------------ tables


def option_rows(schema: dict[str, Any], prefix: str = "") -> Iterator[Row]:
    """One row per option, option groups flattened as ``tls.ca_file``."""
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    for name in sorted(props, key=lambda n: (n != "type", n not in required, n)):
        node = props[name]
        if name == "type" and "const" in node:
            continue  # the plugin's own name, given by the heading
        group = _nested(node)
        type_name = "object" if group is not None else _type_of(node)
        yield Row(f"{prefix}{name}", type_name, _default(node, name in required),
                  _description(node, type_name))
        if group is not None:
            yield from option_rows(group, f"{prefix}{name}.")


def table(rows: Iterator[Row] | list[Row]) -> str:
    lines = ["| option | type | default | description |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.name}` | {r.type} | {r.default} | {r.description} |")
    return "\n".join(lines) + "\n"


def plugin_section(kind: str, name: str, schema: dict[str, Any], level: str = "###") -> str:
    desc = " ".join(str(schema.get("description", "")).split())
    rows = list(option_rows(schema))
    body = table(rows) if rows else "No options.\n"
    return f"{level} {kind}: {name}\n\n{desc}\n\n{body}"


# ------------------------------------------------------------------ the reference


def load_schemas(folder: Path) -> dict[str, dict[str, Any]]:
    """Relative file name (``sources/nats.json``) → schema."""
    return {
        path.relative_to(folder).as_posix(): json.loads(path.read_text())
        for path in sorted(folder.rglob("*.json"))
    }


def _plugin_block_row(name: str, node: dict[str, Any]) -> Row:
    inner = node.get("items", {}) if name == "transforms" else node
    choices = [b for b in _branches(inner) if "properties" in b]
    names = ", ".join(f"`{b['properties']['type']['const']}`" for b in choices
                      if "const" in b.get("properties", {}).get("type", {}))
    kind = {"source": "source", "sink": "sink", "dead_letter": "sink",
            "transforms": "transform"}[name]
    shape = "list of `{type: NAME, ...}`" if name == "transforms" else "`{type: NAME, ...}`"
    text = f"a {kind} block; NAME is one of {names}" if names else f"a {kind} block"
    return Row(name, shape, "", text)


def _settings_rows(schema: dict[str, Any], prefix: str = "") -> list[Row]:
    rows: list[Row] = []
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    for name in props:  # model order: the order a file is usually written in
        node = props[name]
        if name in ("source", "sink", "dead_letter", "transforms") and prefix.startswith(
            "pipelines"
        ):
            row = _plugin_block_row(name, node)
            default = "**required**" if name in required else (
                "`[]`" if name == "transforms" else "none")
            rows.append(Row(f"{prefix}{name}", row.type, default, row.description))
            continue
        if name == "pipelines":
            rows.append(Row("pipelines", "list of pipelines", "**required**",
                            "one or more; the keys below sit in each item"))
            rows.extend(_settings_rows(node["items"], "pipelines[]."))
            continue
        group = _nested(node)
        type_name = "object" if group is not None else _type_of(node)
        rows.append(Row(f"{prefix}{name}", type_name, _default(node, name in required),
                        _description(node, type_name)))
        if group is not None:
            rows.extend(_settings_rows(group, f"{prefix}{name}."))
    return rows


def reference(schemas: dict[str, dict[str, Any]]) -> str:
    """The generated part of docs/configuration.md."""
    parts = ["## The file\n", table(_settings_rows(schemas["pipeline.schema.json"]))]
    for folder, kind in _KINDS:
        names = sorted(rel[len(folder) + 1 : -5] for rel in schemas
                       if rel.startswith(folder + "/"))
        parts.append(f"## {folder.capitalize()}\n")
        parts.append(" · ".join(f"[{n}](#{kind}-{n})" for n in names) + "\n")
        for n in names:
            parts.append(plugin_section(kind, n, schemas[f"{folder}/{n}.json"]))
    return "\n".join(parts)


def _region(names: str, schemas: dict[str, dict[str, Any]], where: str) -> str:
    sections = []
    for rel in names.split():
        folder, _, file = rel.partition("/")
        kind = dict(_KINDS).get(folder)
        schema = schemas.get(f"{rel}.json")
        if kind is None or schema is None:
            raise SystemExit(f"{where}: generated region names unknown schema {rel!r} "
                             "(expected e.g. sources/nats)")
        sections.append(plugin_section(kind, file, schema))
    return "\n".join(sections)


def render(text: str, schemas: dict[str, dict[str, Any]], where: str = "") -> str:
    """``text`` with its generated parts brought up to date."""
    if REFERENCE_MARKER in text:
        head = text.split(REFERENCE_MARKER, 1)[0]
        text = f"{head}{REFERENCE_MARKER}\n\n{reference(schemas)}"

    def fill(m: re.Match[str]) -> str:
        return f"{m['begin']}\n{_region(m['names'], schemas, where)}\n{m['end']}"

    return _REGION.sub(fill, text)


def generated_pages(docs: Path) -> list[Path]:
    """Pages with something to generate: configuration.md and marked regions."""
    return [p for p in sorted(docs.rglob("*.md"))
            if REFERENCE_MARKER in (t := p.read_text()) or _REGION.search(t)]


def update(docs: Path, schemas_dir: Path, *, check: bool = False) -> list[Path]:
    """Rewrite (or with ``check`` only compare) the generated parts; return stale pages."""
    schemas = load_schemas(schemas_dir)
    stale = []
    for page in generated_pages(docs):
        text = page.read_text()
        new = render(text, schemas, str(page))
        if new != text:
            stale.append(page)
            if not check:
                page.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connector.docs_gen",
        description="Regenerate the option tables in docs/ from schemas/.",
        epilog="example:\n  natsconn schema --only-package natsconn\n"
               "  python -m connector.docs_gen            # after an option changed\n"
               "  python -m connector.docs_gen --check    # what the unit tests run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--docs", default="docs", help="documentation folder (default: docs)")
    parser.add_argument("--schemas", default="schemas", help="schema folder (default: schemas)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated part is stale")
    args = parser.parse_args(argv)
    stale = update(Path(args.docs), Path(args.schemas), check=args.check)
    if args.check:
        if stale:
            print("stale generated docs (run `python -m connector.docs_gen`): "
                  + ", ".join(map(str, stale)), file=sys.stderr)
            return 1
        print(f"{args.docs}/ generated parts are up to date")
        return 0
    print(f"updated {len(stale)} page(s)" + (": " + ", ".join(map(str, stale)) if stale else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
