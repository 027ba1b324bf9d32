"""YAML to Python values while remembering the line of every node.

PyYAML's composed node tree keeps marks; we build the values ourselves from it
so that each YAML path (``("pipelines", 0, "sink", "topic")``) maps to a line.
Duplicate keys are an error here, where plain YAML would silently keep the last.
"""

from __future__ import annotations

from typing import Any

import yaml

from .._errors import ConfigError

Path = tuple[str | int, ...]


class Lines(dict[Path, int]):
    """YAML path → 1-based line; ``scalars`` adds, for each scalar, the line and
    1-based column where its text starts and its style (``'``, ``"``, ``|``,
    ``>`` or None for plain), so an error inside a value (an expression) can
    point at the file's column."""

    def __init__(self) -> None:
        super().__init__()
        self.scalars: dict[Path, tuple[int, int, str | None]] = {}


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _line(text: str, number: int | None) -> str:
    lines = text.splitlines()
    return lines[number - 1] if number is not None and 0 < number <= len(lines) else ""


def parse_yaml(text: str, file: str) -> tuple[Any, dict[Path, int]]:
    """Return the document's value and a map from YAML path to 1-based line.

    Any input gives a value or a ConfigError with a line: PyYAML also fails while
    reading (characters YAML does not allow) and while constructing values
    (unknown tags, bad merge keys, impossible dates), not only while parsing.
    """
    lines = Lines()
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None, lines
        value = _build(loader, node, (), lines, file)
        _scalar_columns(text, lines)
        return value, lines
    except yaml.reader.ReaderError as exc:
        at = text.count("\n", 0, max(0, exc.position)) + 1
        raise ConfigError(f"invalid YAML: expected printable text, found the character "
                          f"{chr(exc.character)!r} (#x{exc.character:04x})"
                          if isinstance(exc.character, int) else f"invalid YAML: {exc.reason}",
                          file=file, line=at) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = (exc.problem or exc.context or "invalid YAML").replace(", but got ", ", found ")
        # Where the broken construct began, when that is not where it was noticed
        # (an unclosed '{' is noticed lines later).
        if exc.problem and exc.context and exc.context_mark is not None:
            start = exc.context_mark.line + 1
            if start != line:
                problem += f" ({exc.context} that starts at line {start})"
        if problem == "mapping values are not allowed here":
            problem += "; expected one 'key: value' per line (quote a value holding ': ')"
        elif "${" in _line(text, line):
            problem += "; inside {...} or [...] write a ${VAR} reference in quotes"
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file, line=1) from None
    finally:
        if loader is not None:
            loader.dispose()


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: Path, file: str) -> Any:
    """A scalar's value; a constructor's own failure (``2001-02-30`` looks like a
    date and is none) as a ConfigError at the node's line."""
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, TypeError, OverflowError) as exc:
        # The value is not repeated: it may be a secret.
        raise ConfigError(f"invalid YAML value: {exc} (quote it to keep it as text)", file=file,
                          line=node.start_mark.line + 1, path=format_path(path)) from None


def _build(loader: yaml.SafeLoader, node: yaml.Node, path: Path, lines: dict[Path, int],
           file: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _construct(loader, key_node, path, file)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise ConfigError(
                    f"expected a plain key, found {key!r}", file=file,
                    line=key_node.start_mark.line + 1, path=format_path(path),
                )
            key = str(key) if not isinstance(key, str) else key
            if key in result:
                raise ConfigError(
                    f"duplicate key: expected each key once, found {key!r} again "
                    f"(first at line {lines[(*path, key)]})",
                    file=file, line=key_node.start_mark.line + 1, path=format_path(path),
                )
            child = (*path, key)
            result[key] = _build(loader, value_node, child, lines, file)
            lines[child] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(loader, item, (*path, i), lines, file) for i, item in enumerate(node.value)
        ]
    if isinstance(node, yaml.ScalarNode) and isinstance(lines, Lines):
        lines.scalars[path] = (node.start_mark.line + 1, node.start_mark.column + 1,
                               node.style)
    return _construct(loader, node, path, file)


def _scalar_columns(text: str, lines: Lines) -> None:
    """Move each scalar's position from its mark to its first character of text."""
    rows = text.splitlines()
    for path, (line, column, style) in list(lines.scalars.items()):
        if style in ("'", '"'):
            lines.scalars[path] = (line, column + 1, style)
        elif style in ("|", ">"):
            # The text starts on the next non-blank line, at its indentation.
            at = line  # 0-based index of the line after the indicator
            while at < len(rows) and not rows[at].strip():
                at += 1
            if at < len(rows):
                indent = len(rows[at]) - len(rows[at].lstrip(" "))
                lines.scalars[path] = (at + 1, indent + 1, style)
