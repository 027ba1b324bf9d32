"""JSON Schemas for pipeline files and every installed plugin's options.

``pipeline.schema.json`` is the one editors use: each ``source``/``sink``/
``transforms`` block is a ``oneOf`` over the installed plugins, selected by
``type``. Per-plugin files sit beside it for reference documentation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from .config.model import FileSpec
from .registry import Kind, Registry

_DIRS: dict[Kind, str] = {"source": "sources", "sink": "sinks", "transform": "transforms"}


class _WithFactoryDefaults(GenerateJsonSchema):
    """States defaults that come from a ``default_factory`` (``servers``, empty
    lists, nested option groups), which pydantic otherwise leaves out."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        return super().get_default_value(schema)


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """Resolve local ``$ref``s so a plugin schema can be embedded anywhere."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = copy.deepcopy(defs[ref.split("/")[-1]])
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return walk({**target, **rest})
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


# Any value may be written as a reference that the loader expands first; without
# this an editor flags `count: ${COUNT:-100}` as "not an integer".
_REFERENCE: dict[str, Any] = {
    "type": "string",
    "pattern": r"\$\{[^}]*\}",
    "description": "a ${VAR}, ${VAR:-default} or ${file:/path} reference, expanded on load",
}
_META = ("title", "description", "default")


def _branches(node: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("anyOf", "oneOf"):
        if key in node:
            return [b for sub in node[key] for b in _branches(sub)]
    return [node]


def _wants_reference(node: dict[str, Any]) -> bool:
    """A scalar field that a plain ``${VAR}`` string would not satisfy."""
    branches = _branches(node)
    for b in branches:
        if b.get("type") in ("object", "array") or "properties" in b:
            return False
        if "type" not in b and "const" not in b and "enum" not in b:
            return False  # unconstrained: anything goes already
    return not any(b.get("type") == "string" and not {"pattern", "enum", "const", "format"}
                   & b.keys() for b in branches)


def _allow_references(node: Any) -> None:
    """Let every scalar option also be a ``${...}`` reference (in place)."""
    if isinstance(node, list):
        for item in node:
            _allow_references(item)
        return
    if not isinstance(node, dict):
        return
    for value in node.values():
        _allow_references(value)
    props = node.get("properties")
    if isinstance(props, dict):
        for name, prop in props.items():
            if isinstance(prop, dict) and "const" not in prop and _wants_reference(prop):
                meta = {k: prop[k] for k in _META if k in prop}
                body = {k: v for k, v in prop.items() if k not in meta}
                choices = body["anyOf"] if list(body) == ["anyOf"] else [body]
                props[name] = {**meta, "anyOf": [*choices, _REFERENCE]}


def plugin_schema(kind: Kind, name: str, registry: Registry) -> dict[str, Any]:
    cls = registry.load(kind, name)
    schema = _inline(cls.Config.model_json_schema(schema_generator=_WithFactoryDefaults))
    _allow_references(schema)
    props = {"type": {"const": name, "description": cls.description()}}
    props.update(schema.get("properties", {}))
    return {
        "title": f"{kind} {name}",
        "description": cls.description(),
        "type": "object",
        "properties": props,
        "required": ["type", *schema.get("required", [])],
        "additionalProperties": False,
    }


def build_schemas(registry: Registry, package: str | None = None) -> dict[str, dict[str, Any]]:
    """Relative file name → schema."""
    files: dict[str, dict[str, Any]] = {}
    choices: dict[Kind, list[dict[str, Any]]] = {}
    for kind, folder in _DIRS.items():
        choices[kind] = []
        for info in registry.infos(kind):
            if package is not None and info.package != package:
                continue
            schema = plugin_schema(kind, info.name, registry)
            files[f"{folder}/{info.name}.json"] = schema
            choices[kind].append(schema)
    top = _inline(FileSpec.model_json_schema(schema_generator=_WithFactoryDefaults))
    _allow_references(top)  # before the plugin schemas go in: they have had it
    top["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    top["title"] = "natsconn pipeline file"
    pipe = top["properties"]["pipelines"]["items"]["properties"]
    pipe["source"] = {"oneOf": choices["source"]}
    pipe["sink"] = {"oneOf": choices["sink"]}
    pipe["dead_letter"] = {"anyOf": [{"oneOf": choices["sink"]}, {"type": "null"}],
                           "default": None}
    pipe["transforms"] = {"type": "array", "items": {"oneOf": choices["transform"]},
                          "default": []}
    files["pipeline.schema.json"] = top
    return files


def write_schemas(out: Path, registry: Registry, *, check: bool = False,
                  package: str | None = None) -> list[str]:
    """Write (or with ``check``, compare) the schemas; return the stale file names."""
    stale = []
    wanted = build_schemas(registry, package)
    for rel, schema in sorted(wanted.items()):
        path = out / rel
        text = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(rel)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if out.exists():
        for path in sorted(out.rglob("*.json")):
            rel = path.relative_to(out).as_posix()
            if rel not in wanted:
                stale.append(rel)
                if not check:
                    path.unlink()
    return stale
