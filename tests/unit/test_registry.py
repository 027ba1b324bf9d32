"""The plugin registry: entry points, near-miss names, clashes, broken plugins.

Third-party packages are simulated with real ``*.dist-info`` directories on
``sys.path``: importlib.metadata (and stevedore) find them as they would an
installed distribution.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError
from stevedore.extension import ExtensionManager

from connector import PluginLoadError, Sink, Source
from connector.registry import Registry

from ._fakes import FakeSink, FakeSource

GOOD_PLUGIN = """
from connector import Batch, PluginConfig, Source

class GoodConfig(PluginConfig):
    level: int = 1

class GoodSource(Source[GoodConfig]):
    '''A third-party source for registry tests.'''
    Config = GoodConfig

    async def read_batch(self, max_messages, max_wait):
        return None
"""


class Dists:
    """Writes fake distributions into one directory put on sys.path."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex[:8]
        monkeypatch.syspath_prepend(str(root))

    def module(self, stem: str, source: str) -> str:
        name = f"{stem}_{self.tag}"
        (self.root / f"{name}.py").write_text(source)
        return name

    def dist(self, name: str, sources: dict[str, str] | None = None,
             sinks: dict[str, str] | None = None) -> None:
        info = self.root / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        text = ""
        for group, entries in (("natsconn.sources", sources), ("natsconn.sinks", sinks)):
            if entries:
                text += f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
        (info / "entry_points.txt").write_text(text)


@pytest.fixture
def dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dists:
    # stevedore keeps the entry points it saw first for the life of the process;
    # packages "installed" by a test must not be hidden by an earlier test's view.
    monkeypatch.setattr(ExtensionManager, "ENTRY_POINT_CACHE", {})
    return Dists(tmp_path, monkeypatch)


# ------------------------------------------------------------------ installed


def test_built_in_plugins_are_registered_by_natsconn() -> None:
    registry = Registry()
    sources = {i.name: i for i in registry.infos("source")}
    sinks = {i.name: i for i in registry.infos("sink")}
    assert {"generate", "jetstream", "nats"} <= set(sources)
    assert {"drop", "jetstream", "nats"} <= set(sinks)
    assert {"map_subject", "json_validate"} <= set(registry.names("transform"))
    assert sources["generate"].package == "natsconn"
    assert sources["generate"].target == "natsconn_dev.generate:GenerateSource"
    cls = registry.load("source", "jetstream")
    assert issubclass(cls, Source) and cls.__name__ == "JetStreamSource"
    assert registry.load("source", "jetstream") is cls  # cached
    assert issubclass(registry.load("sink", "drop"), Sink)


def test_unknown_type_lists_installed_and_suggests_the_nearest() -> None:
    registry = Registry()
    with pytest.raises(PluginLoadError) as info:
        registry.load("source", "jetsream")
    text = str(info.value)
    assert "unknown source type 'jetsream'" in text
    assert "did you mean 'jetstream'?" in text
    for name in ("generate", "jetstream", "nats"):
        assert name in text
    with pytest.raises(PluginLoadError) as info:
        registry.load("sink", "zzzz")
    assert "did you mean" not in str(info.value)
    assert "drop" in str(info.value)


def test_kinds_are_separate_namespaces() -> None:
    with pytest.raises(PluginLoadError, match="unknown sink type 'generate'"):
        Registry().load("sink", "generate")


def test_plugin_make_test_instance_validates_options() -> None:
    cls = Registry().load("source", "generate")
    source = cls.make_test_instance(count=3, size=64)
    assert source.config.count == 3
    assert source.context.pipeline == "test"
    with pytest.raises(ValidationError):
        cls.make_test_instance(count="many")
    with pytest.raises(ValidationError):
        cls.make_test_instance(colour="red")


# ------------------------------------------------------------- test registry


def test_make_test_instance_serves_given_classes_only() -> None:
    registry = Registry.make_test_instance({"source": {"fake": FakeSource},
                                            "sink": {"fake": FakeSink, "fake2": FakeSink}})
    assert registry.load("source", "fake") is FakeSource
    assert registry.names("sink") == ["fake", "fake2"]
    assert registry.names("transform") == []
    [info] = registry.infos("source")
    assert (info.name, info.target) == ("fake", f"{FakeSource.__module__}:FakeSource")
    with pytest.raises(PluginLoadError) as err:
        registry.load("source", "generate")
    assert "unknown source type 'generate'" in str(err.value)
    assert "fake" in str(err.value)
    with pytest.raises(PluginLoadError, match="did you mean 'fake2'"):
        registry.load("sink", "fak2")


# ------------------------------------------------------- third-party packages


def test_third_party_plugin_loads_with_its_package(dists: Dists) -> None:
    mod = dists.module("good_plugin", GOOD_PLUGIN)
    name = f"good-{dists.tag}"
    dists.dist("natsconn-fake-good", sources={name: f"{mod}:GoodSource"})
    registry = Registry()
    info = next(i for i in registry.infos("source") if i.name == name)
    assert (info.package, info.version) == ("natsconn-fake-good", "1.0")
    cls = registry.load("source", name)
    assert cls.__name__ == "GoodSource"
    assert cls.description() == "A third-party source for registry tests."


def test_one_name_from_two_packages_is_an_error_naming_both(dists: Dists) -> None:
    mod = dists.module("dupe_plugin", GOOD_PLUGIN)
    name = f"dupe-{dists.tag}"
    dists.dist("natsconn-fake-alpha", sources={name: f"{mod}:GoodSource"})
    dists.dist("natsconn-fake-beta", sources={name: f"{mod}:GoodSource"})
    registry = Registry()
    with pytest.raises(PluginLoadError) as info:
        registry.load("source", name)
    text = str(info.value)
    assert f"source plugin name {name!r} is registered by more than one package" in text
    assert "natsconn-fake-alpha" in text and "natsconn-fake-beta" in text
    with pytest.raises(PluginLoadError, match="natsconn-fake-alpha"):
        registry.infos("source")  # listing every plugin reports the clash too


def test_a_clash_on_one_name_does_not_break_other_plugins(dists: Dists) -> None:
    mod = dists.module("dupe_plugin", GOOD_PLUGIN)
    name = f"dupe-{dists.tag}"
    dists.dist("natsconn-fake-alpha", sources={name: f"{mod}:GoodSource"})
    dists.dist("natsconn-fake-beta", sources={name: f"{mod}:GoodSource"})
    registry = Registry()
    assert registry.load("source", "generate").__name__ == "GenerateSource"
    with pytest.raises(PluginLoadError, match="did you mean 'jetstream'"):
        registry.load("source", "jetsream")


def test_plugin_failing_to_import_names_its_package_and_the_exception(dists: Dists) -> None:
    mod = dists.module("broken_plugin", "raise RuntimeError('boom: missing native library')\n")
    name = f"broken-{dists.tag}"
    dists.dist("natsconn-fake-broken", sinks={name: f"{mod}:BrokenSink"})
    registry = Registry()
    assert name in registry.names("sink")  # listed without importing it
    with pytest.raises(PluginLoadError) as info:
        registry.load("sink", name)
    text = str(info.value)
    assert f"sink plugin {name!r} from package natsconn-fake-broken failed to load" in text
    assert "RuntimeError: boom: missing native library" in text
    assert registry.load("sink", "drop").__name__ == "DropSink"  # others are unaffected


def test_plugin_missing_its_attribute_names_the_package(dists: Dists) -> None:
    mod = dists.module("empty_plugin", "X = 1\n")
    name = f"noattr-{dists.tag}"
    dists.dist("natsconn-fake-noattr", sources={name: f"{mod}:Missing"})
    with pytest.raises(PluginLoadError) as info:
        Registry().load("source", name)
    assert "natsconn-fake-noattr" in str(info.value)
    assert "AttributeError" in str(info.value)


def test_entry_point_that_is_not_a_plugin_class_is_refused(dists: Dists) -> None:
    mod = dists.module("wrong_plugin", GOOD_PLUGIN)
    name = f"wrongkind-{dists.tag}"
    dists.dist("natsconn-fake-wrong", sinks={name: f"{mod}:GoodSource"})  # a Source as a sink
    with pytest.raises(PluginLoadError) as info:
        Registry().load("sink", name)
    text = str(info.value)
    assert "natsconn-fake-wrong" in text
    assert "not a subclass of connector.Sink" in text
