"""The chart ships the Grafana dashboard as a ConfigMap for Grafana's sidecar."""

from __future__ import annotations

import json

from .chart import CHART, Helm


def _dashboard_maps(helm: Helm, *sets: str) -> list[dict[str, object]]:
    m = helm.render(sets=list(sets))
    return [d for d in m.docs if d["kind"] == "ConfigMap" and "natsconn.json" in d["data"]]


def test_the_dashboard_configmap_carries_the_file_and_the_sidecar_label(helm: Helm) -> None:
    (cm,) = _dashboard_maps(helm)
    meta = cm["metadata"]
    assert isinstance(meta, dict)
    assert meta["name"] == "rel-natsconn-dashboard"
    assert meta["namespace"] == "natsconn"
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["labels"]["app.kubernetes.io/name"] == "natsconn"
    data = cm["data"]
    assert isinstance(data, dict)
    shipped = json.loads(data["natsconn.json"])
    assert shipped == json.loads((CHART / "dashboards" / "natsconn.json").read_text())
    assert shipped["uid"] == "natsconn"


def test_the_dashboard_label_namespace_and_toggle_are_values(helm: Helm) -> None:
    (cm,) = _dashboard_maps(helm, "dashboard.label=my_dashboards",
                            "dashboard.labelValue=yes", "dashboard.namespace=monitoring",
                            "dashboard.annotations.grafana_folder=natsconn")
    meta = cm["metadata"]
    assert isinstance(meta, dict)
    assert meta["labels"]["my_dashboards"] == "yes"
    assert "grafana_dashboard" not in meta["labels"]
    assert meta["namespace"] == "monitoring"
    assert meta["annotations"] == {"grafana_folder": "natsconn"}
    assert _dashboard_maps(helm, "dashboard.enabled=false") == []


def test_a_bad_dashboard_label_is_refused(helm: Helm) -> None:
    proc = helm.run(*helm.template_args(sets=["dashboard.label=not a label"]), check=False)
    assert proc.returncode != 0
    assert "dashboard.label" in proc.stderr or "/dashboard/label" in proc.stderr, proc.stderr
