"""Finding plugins: stevedore over the ``natsconn.*`` entry-point groups.

Plugins load lazily, one name at a time, so a broken third-party package only
matters when a pipeline asks for it. Two distributions registering one name is
an error that names both; it is never resolved by picking one.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

from stevedore import DriverManager
from stevedore.exception import NoMatches

from ._errors import PluginLoadError
from ._plugin import Plugin, Sink, Source, Transform

Kind = Literal["source", "sink", "transform"]
NAMESPACES: dict[Kind, str] = {
    "source": "natsconn.sources",
    "sink": "natsconn.sinks",
    "transform": "natsconn.transforms",
}
_BASES: dict[Kind, type[Plugin]] = {  # type: ignore[type-arg]
    "source": Source, "sink": Sink, "transform": Transform,
}


@dataclass(frozen=True, slots=True)
class PluginInfo:
    kind: Kind
    name: str
    target: str
    package: str
    version: str


def _distribution(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "(unknown package)", ""
    return dist.metadata["Name"] or "(unknown package)", dist.version or ""


def _single(kind: Kind, name: str, found: list[PluginInfo]) -> PluginInfo:
    if len(found) > 1:
        who = " and ".join(f"{i.package} ({i.target})" for i in found)
        raise PluginLoadError(
            f"{kind} plugin name {name!r} is registered by more than one package: {who}; "
            "uninstall one of them"
        )
    return found[0]


class Registry:
    """Installed plugins by kind and name."""

    def __init__(self, classes: Mapping[Kind, Mapping[str, type[Plugin]]] | None = None) -> None:  # type: ignore[type-arg]
        self._fixed = classes
        self._cache: dict[tuple[Kind, str], type[Plugin]] = {}  # type: ignore[type-arg]

    @classmethod
    def make_test_instance(
        cls, classes: Mapping[Kind, Mapping[str, type[Plugin]]]  # type: ignore[type-arg]
    ) -> Registry:
        """A registry of given classes, with no entry points involved."""
        return cls(classes)

    def infos(self, kind: Kind) -> list[PluginInfo]:
        if self._fixed is not None:
            return [
                PluginInfo(kind, n, f"{c.__module__}:{c.__qualname__}", c.__module__, "")
                for n, c in sorted(self._fixed.get(kind, {}).items())
            ]
        out: list[PluginInfo] = []
        for name, found in sorted(self._scan(kind).items()):
            out.append(_single(kind, name, found))
        return out

    def _scan(self, kind: Kind) -> dict[str, list[PluginInfo]]:
        """Every registration by name; several per name when packages clash."""
        seen: dict[str, dict[tuple[str, str], PluginInfo]] = defaultdict(dict)
        for ep in metadata.entry_points(group=NAMESPACES[kind]):
            package, version = _distribution(ep)
            seen[ep.name][(package, ep.value)] = PluginInfo(kind, ep.name, ep.value, package,
                                                            version)
        return {name: list(by_package.values()) for name, by_package in seen.items()}

    def names(self, kind: Kind) -> list[str]:
        """Installed names, clashing ones included (a clash is reported on use)."""
        if self._fixed is not None:
            return sorted(self._fixed.get(kind, {}))
        return sorted(self._scan(kind))

    def unknown(self, kind: Kind, name: str) -> str:
        """The sentence for an unknown ``type:``, with the nearest installed name."""
        names = self.names(kind)
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        installed = ", ".join(names) or "none"
        return f"unknown {kind} type {name!r}{hint} (expected an installed one: {installed})"

    def load(self, kind: Kind, name: str) -> type[Plugin]:  # type: ignore[type-arg]
        key = (kind, name)
        if key in self._cache:
            return self._cache[key]
        if self._fixed is not None:
            found = self._fixed.get(kind, {}).get(name)
            if found is None:
                raise PluginLoadError(self.unknown(kind, name))
            self._cache[key] = found
            return found
        # Only a clash on this name matters here: another package's clash must not
        # stop every pipeline from loading its plugins.
        registered = self._scan(kind).get(name)
        if not registered:
            raise PluginLoadError(self.unknown(kind, name))
        info = _single(kind, name, registered)
        failures: list[BaseException] = []

        def on_failure(_manager: object, _ep: object, exc: BaseException) -> None:
            failures.append(exc)

        try:
            try:
                manager: DriverManager[Any] = DriverManager(
                    NAMESPACES[kind], name, invoke_on_load=False,
                    on_load_failure_callback=on_failure,
                )
                plugin = manager.driver
            except NoMatches:
                # stevedore's on-disk entry-point cache can lag behind a pip install
                # (seen when it was written mid-install); the metadata just read is
                # the truth, so load from it rather than call the plugin missing.
                plugin = _entry_point(kind, name, info.target).load()
        except Exception as exc:
            cause = failures[0] if failures else exc
            raise PluginLoadError(
                f"{kind} plugin {name!r} from package {info.package} failed to load: "
                f"{type(cause).__name__}: {cause}"
            ) from cause
        base = _BASES[kind]
        if not (isinstance(plugin, type) and issubclass(plugin, base)):
            raise PluginLoadError(
                f"{kind} plugin {name!r} from package {info.package} is {plugin!r}, "
                f"not a subclass of connector.{base.__name__}"
            )
        self._cache[key] = plugin
        return plugin


def _entry_point(kind: Kind, name: str, target: str) -> metadata.EntryPoint:
    for ep in metadata.entry_points(group=NAMESPACES[kind]):
        if ep.name == name and ep.value == target:
            return ep
    raise PluginLoadError(f"{kind} plugin {name!r} ({target}) is no longer installed")
