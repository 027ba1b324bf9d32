"""Hot reload: validate the new file, then change only what changed.

Pipelines are matched by name and compared by their whole effective
configuration (after ``${VAR}`` interpolation, so a changed secret counts):
unchanged ones keep running untouched, changed ones drain and restart with the
new configuration, removed ones drain and stop, added ones start. A file that
does not validate changes nothing; the error is kept for the API, logged and
counted.

Process settings (``http``, ``log``, ``shutdown_timeout``…) take effect at the
next start; a reload that changes them says so in its outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from .._errors import ConfigError, PluginLoadError
from ..config.loader import LoadedFile, load_file
from ..ops.metrics import REGISTRY
from .supervisor import Supervisor

log = logging.getLogger("natsconn.reload")

RELOADS = Counter("natsconn_reloads", "Reloads of the pipeline file, by outcome", ("outcome",),
                  registry=REGISTRY)


@dataclass(frozen=True, slots=True)
class Plan:
    unchanged: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    added: tuple[str, ...]


def plan(old: LoadedFile, new: LoadedFile) -> Plan:
    """What a reload from ``old`` to ``new`` does, pipeline by pipeline."""
    before = {p.spec.name: p for p in old.pipelines}
    after = {p.spec.name: p for p in new.pipelines}
    unchanged = tuple(n for n in after if n in before and before[n].spec == after[n].spec)
    changed = tuple(n for n in after if n in before and before[n].spec != after[n].spec)
    removed = tuple(n for n in before if n not in after)
    added = tuple(n for n in after if n not in before)
    return Plan(unchanged, changed, removed, added)


def _settings(loaded: LoadedFile) -> dict[str, Any]:
    return loaded.spec.model_dump(exclude={"pipelines"})


@dataclass(slots=True)
class Outcome:
    ok: bool
    at: float = field(default_factory=time.time)
    error: str | None = None
    plan: Plan | None = None
    restart_needed_for: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "at": _iso(self.at)}
        if self.error is not None:
            out["error"] = self.error
        if self.plan is not None:
            out.update(unchanged=list(self.plan.unchanged), changed=list(self.plan.changed),
                       removed=list(self.plan.removed), added=list(self.plan.added))
        if self.restart_needed_for:
            out["restart_needed_for"] = list(self.restart_needed_for)
        return out


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Reloader:
    """Reloads ``path`` into ``supervisor``; one reload at a time."""

    def __init__(self, supervisor: Supervisor, path: str,
                 load: Callable[[str], LoadedFile] = load_file,
                 on_loaded: Callable[[LoadedFile], None] | None = None) -> None:
        self.supervisor = supervisor
        self.path = path
        self._load = load
        self._on_loaded = on_loaded
        self._lock = asyncio.Lock()
        self.last: Outcome | None = None

    async def reload(self) -> Outcome:
        async with self._lock:
            outcome = self._reload()
            self.last = outcome
            RELOADS.labels("applied" if outcome.ok else "invalid").inc()
            return outcome

    def _reload(self) -> Outcome:
        sup = self.supervisor
        if sup.stopping:
            return Outcome(False, error="the process is stopping")
        try:
            new = self._load(self.path)
        except (ConfigError, PluginLoadError) as exc:
            text = exc.render() if isinstance(exc, ConfigError) else str(exc)
            log.error("reload refused, nothing changed: %s", text)
            return Outcome(False, error=text)
        if self._on_loaded is not None:
            self._on_loaded(new)  # the new secrets join the log redaction first
        todo = plan(sup.loaded, new)
        configs = {p.spec.name: p for p in new.pipelines}
        for name in todo.removed:
            sup.remove(name)
        for name in todo.changed:
            sup.restart(name, configs[name])
        for name in todo.added:
            sup.add(configs[name])
        old_settings = _settings(sup.loaded)
        new_settings = _settings(new)
        later = tuple(k for k in new_settings if new_settings[k] != old_settings.get(k))
        # Unchanged pipelines keep their config objects; the file is the new one.
        sup.loaded = LoadedFile(new.file, new.spec.model_copy(
            update={k: getattr(sup.loaded.spec, k) for k in later}), new.pipelines,
            sup.loaded.secrets | new.secrets)
        log.info("reloaded %s: %d unchanged, %d changed, %d removed, %d added", self.path,
                 len(todo.unchanged), len(todo.changed), len(todo.removed), len(todo.added))
        if later:
            log.warning("reload: %s take effect at the next start", ", ".join(later))
        return Outcome(True, plan=todo, restart_needed_for=later)


async def watch(reloader: Reloader) -> None:
    """Reload whenever the file's content changes (``natsconn run --watch``).

    The folder is watched, not the file: editors save by renaming a new file
    over the old one, and a Kubernetes ConfigMap swaps a symlink; the content
    is compared so that a touch or an unrelated file changes nothing.
    """
    from watchfiles import awatch

    target = Path(reloader.path)
    last = _digest(target)
    folder = await asyncio.to_thread(lambda: target.parent.resolve())
    # yield_on_timeout: also look every second, so that a change made before the
    # watch was in place (or an event the kernel dropped) is not missed.
    async for _changes in awatch(folder, debounce=300, recursive=False,
                                 rust_timeout=1000, yield_on_timeout=True):
        now = _digest(target)
        if now != last:
            last = now
            await reloader.reload()


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None
