"""Pass one (structure) and pass two (each plugin's options) over a pipeline file."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from pydantic import SecretBytes, SecretStr, ValidationError

from .._errors import ConfigError, PluginLoadError
from .._expr import Expression
from .._plugin import Plugin, PluginConfig
from ..registry import Kind, Registry
from .errors import from_validation_error
from .interpolate import interpolate
from .model import BatchPolicy, FileSpec, PipelineSpec, PluginSpec, RetryPolicy
from .yaml_tree import Path, format_path, parse_yaml


@dataclass(frozen=True, slots=True)
class ResolvedPlugin:
    """A plugin block checked against its plugin's own options model."""

    kind: Kind
    name: str
    cls: type[Plugin]  # type: ignore[type-arg]
    config: PluginConfig


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One sink of a pipeline with its effective policies (the pipeline's where unset)."""

    name: str
    when: Expression | None
    sink: ResolvedPlugin
    transforms: tuple[ResolvedPlugin, ...]
    batch: BatchPolicy
    max_in_flight: int
    retry: RetryPolicy
    dead_letter: ResolvedPlugin | None  # None: the pipeline's


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    spec: PipelineSpec
    source: ResolvedPlugin
    transforms: tuple[ResolvedPlugin, ...]
    routes: tuple[RouteConfig, ...]
    dead_letter: ResolvedPlugin | None

    @property
    def sink(self) -> ResolvedPlugin:
        """The first (with ``sink:``, the only) sink."""
        return self.routes[0].sink


@dataclass(slots=True)
class LoadedFile:
    file: str
    spec: FileSpec
    pipelines: list[PipelineConfig]
    secrets: set[str] = field(default_factory=set)


def load_file(
    path: str | FsPath, registry: Registry | None = None, env: Mapping[str, str] | None = None
) -> LoadedFile:
    name = str(path)
    try:
        text = FsPath(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=name) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"expected UTF-8 text, found an undecodable byte at {exc.start}",
                          file=name) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=name) from None
    return load_text(text, name, registry, env)


def load_text(
    text: str,
    file: str = "<string>",
    registry: Registry | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedFile:
    registry = registry if registry is not None else Registry()
    raw, lines = parse_yaml(text, file)
    if raw is None:
        raise ConfigError("the file is empty: expected a mapping with 'pipelines:', found "
                          "nothing",
                          file=file, line=1)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"expected a mapping with 'pipelines:' at the top, found {type(raw).__name__}",
            file=file, line=lines.get(()),
        )
    secrets: set[str] = set()
    data = interpolate(raw, lines, file, env, secrets.add)
    try:
        return _validate(data, file, lines, registry, secrets)
    except ConfigError as exc:
        if not secrets:
            raise
        # A value read with ${file:...} never shows in an error, whatever field it sits in.
        message = exc.message
        for secret in sorted(secrets, key=len, reverse=True):
            message = message.replace(secret, "***")
        raise ConfigError(message, file=exc.file, line=exc.line, path=exc.path) from None


def _validate(data: dict[str, Any], file: str, lines: Mapping[Path, int], registry: Registry,
              secrets: set[str]) -> LoadedFile:
    _unique_names(data, file, lines)
    try:
        spec = FileSpec.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, FileSpec, file=file, lines=lines) from None

    pipelines = []
    for i, p in enumerate(spec.pipelines):
        base: Path = ("pipelines", i)
        source = _resolve(registry, "source", p.source, (*base, "source"), file, lines, p.name)
        transforms = tuple(
            _resolve(registry, "transform", t, (*base, "transforms", j), file, lines, p.name)
            for j, t in enumerate(p.transforms)
        )
        routes = _routes(registry, p, base, file, lines)
        dlq = (
            _resolve(registry, "sink", p.dead_letter, (*base, "dead_letter"), file, lines, p.name)
            if p.dead_letter is not None
            else None
        )
        plugins = [source, *transforms, *([dlq] if dlq else [])]
        for r in routes:
            plugins += [r.sink, *r.transforms, *([r.dead_letter] if r.dead_letter else [])]
        for plugin in plugins:
            _collect_secrets(plugin.config, secrets)
        pipelines.append(PipelineConfig(p, source, transforms, routes, dlq))
    return LoadedFile(file, spec, pipelines, secrets)


def _routes(registry: Registry, p: PipelineSpec, base: Path, file: str,
            lines: Mapping[Path, int]) -> tuple[RouteConfig, ...]:
    names = p.sink_names()
    if p.sink is not None:
        sink = _resolve(registry, "sink", p.sink, (*base, "sink"), file, lines, p.name)
        return (RouteConfig(names[0], None, sink, (), p.batch, p.max_in_flight, p.retry, None),)
    routes = []
    for i, r in enumerate(p.sinks):
        at: Path = (*base, "sinks", i)
        routes.append(RouteConfig(
            names[i], r.when,
            _resolve(registry, "sink", r.sink, (*at, "sink"), file, lines, p.name),
            tuple(_resolve(registry, "transform", t, (*at, "transforms", j), file, lines,
                           p.name) for j, t in enumerate(r.transforms)),
            r.batch if r.batch is not None else p.batch,
            r.max_in_flight if r.max_in_flight is not None else p.max_in_flight,
            r.retry if r.retry is not None else p.retry,
            (_resolve(registry, "sink", r.dead_letter, (*at, "dead_letter"), file, lines,
                      p.name) if r.dead_letter is not None else None),
        ))
    return tuple(routes)


def _unique_names(data: dict[str, Any], file: str, lines: Mapping[Path, int]) -> None:
    """Two pipelines with one name: the error points at the second one's line (the
    model's own check only knows the whole file)."""
    pipelines = data.get("pipelines")
    if not isinstance(pipelines, list):
        return
    first: dict[str, int] = {}
    for i, p in enumerate(pipelines):
        name = p.get("name") if isinstance(p, dict) else None
        if not isinstance(name, str):
            continue
        path: Path = ("pipelines", i, "name")
        if name in first:
            raise ConfigError(
                f"expected a unique pipeline name, found {name!r} again (first at line "
                f"{lines.get(('pipelines', first[name], 'name'))})",
                file=file, line=lines.get(path), path=format_path(path),
            )
        first[name] = i


def _resolve(
    registry: Registry,
    kind: Kind,
    spec: PluginSpec,
    path: Path,
    file: str,
    lines: Mapping[Path, int],
    pipeline: str,
) -> ResolvedPlugin:
    try:
        cls = registry.load(kind, spec.type)
    except PluginLoadError as exc:
        raise ConfigError(str(exc), file=file, line=lines.get((*path, "type"), lines.get(path)),
                          path=format_path((*path, "type"))) from None
    try:
        config = cls.Config.model_validate(spec.options(), context=_context(file))
    except ValidationError as exc:
        raise from_validation_error(
            exc, cls.Config, file=file, lines=lines, prefix=path,
            what=f"{kind} plugin {spec.type!r} in pipeline {pipeline!r}",
        ) from None
    except ConfigError as exc:  # a plugin's own validator may raise one
        raise ConfigError(exc.message, file=file, line=lines.get(path),
                          path=format_path(path)) from None
    return ResolvedPlugin(kind, spec.type, cls, config)


def _context(file: str) -> dict[str, Any]:
    """What a plugin's validators may read from ``info.context``: ``base_dir``,
    the folder of the pipeline file, against which relative paths resolve."""
    if file.startswith("<"):
        return {}
    return {"base_dir": str(FsPath(file).resolve().parent)}


_URL_PASSWORD = re.compile(r"://[^/@:\s]*:([^/@\s]+)@")


def _collect_secrets(value: Any, out: set[str]) -> None:
    """Every SecretStr/SecretBytes value below a config, and every password
    written inside a URL (``redis://user:pw@host``), for log redaction."""
    if isinstance(value, str):
        out.update(m.group(1) for m in _URL_PASSWORD.finditer(value))
    elif isinstance(value, SecretStr):
        if value.get_secret_value():
            out.add(value.get_secret_value())
    elif isinstance(value, SecretBytes):
        raw = value.get_secret_value()
        if raw:
            out.add(raw.decode("utf-8", "replace"))
    elif isinstance(value, PluginConfig | dict | list | tuple):
        items: Any = (
            (getattr(value, n) for n in type(value).model_fields)
            if isinstance(value, PluginConfig)
            else value.values() if isinstance(value, dict) else value
        )
        for item in items:
            _collect_secrets(item, out)
    elif hasattr(value, "model_fields"):
        for n in type(value).model_fields:
            _collect_secrets(getattr(value, n), out)
