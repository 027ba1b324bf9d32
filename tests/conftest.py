"""Suite-wide collection rules.

Tests marked ``image`` build the container image (scripts/image: a debootstrap
base and a podman build, minutes when nothing is cached) and are left out of the
default run, which says so in its summary; ``pytest -m image`` (or
NATSCONN_IMAGE_BUILD=1) runs them. Nothing is skipped silently.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = config.getoption("-m") or ""
    if "image" in wanted or os.environ.get("NATSCONN_IMAGE_BUILD"):
        return
    left = [i for i in items if i.get_closest_marker("image") is not None]
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = [i for i in items if i.get_closest_marker("image") is None]
        config.stash[_LEFT] = len(left)


_LEFT = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    left = config.stash.get(_LEFT, 0)
    if left:
        terminalreporter.write_line(
            f"{left} image test(s) deselected: the container build takes minutes; run "
            "`scripts/test -m image` (or NATSCONN_IMAGE_BUILD=1) for them")
