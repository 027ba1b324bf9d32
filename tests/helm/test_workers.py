"""The chart passes `--workers` from the container's CPU limit (issue 15)."""

from __future__ import annotations

import pytest

from connector.cli import _parser

from .chart import Helm


@pytest.mark.parametrize(("sets", "expected"), [
    ([], 1),  # no CPU limit: one worker
    (["resources.limits.cpu=2"], 2),
    (["resources.limits.cpu=1500m"], 2),
    (["resources.limits.cpu=500m"], 1),
    (["resources.limits.cpu=3.2"], 4),
    (["resources.limits.cpu=4", "workers=3"], 3),
])
def test_workers_follow_the_cpu_limit(helm: Helm, sets: list[str], expected: int) -> None:
    args = _parser().parse_args(helm.render(sets=sets).container("natsconn")["args"])
    assert args.workers == expected


def test_a_bad_workers_value_is_refused_by_the_schema(helm: Helm) -> None:
    proc = helm.run(*helm.template_args(sets=["workers=many"]), check=False)
    assert proc.returncode != 0 and "workers" in proc.stderr
