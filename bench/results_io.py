"""Where a bench command's results go: ``<kind>-<timestamp>.json`` with every
sample and the conditions, and ``<kind>-latest.md`` with the table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar


class _Result(Protocol):
    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Result)


def conditions_section(cond: dict[str, Any]) -> list[str]:
    """The "Conditions" part every results page ends with."""
    return ["## Conditions", "", *(f"- {k}: {v}" for k, v in cond.items()), ""]


def write_results(kind: str, results: list[R], cond: dict[str, Any], out_dir: Path,
                  markdown: Callable[[list[R], dict[str, Any]], str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"{kind}-{stamp}.json"
    json_path.write_text(json.dumps(
        {"conditions": cond, "results": [r.to_json() for r in results]}, indent=1))
    md_path = out_dir / f"{kind}-latest.md"
    md_path.write_text(markdown(results, cond))
    return json_path, md_path
