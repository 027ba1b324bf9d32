"""Fixtures of the chart and image tests."""

from __future__ import annotations

import pytest

from .chart import Helm, install_helm


@pytest.fixture(scope="session")
def helm() -> Helm:
    """Helm, built by scripts/helm when missing (a failed build fails the tests)."""
    return Helm(install_helm())
