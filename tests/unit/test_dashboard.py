"""The Grafana dashboard (helm/natsconn/dashboards/natsconn.json) queries only
metrics natsconn exports, with labels those metrics have, and has the panels the
operations docs promise."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from connector.engine import reload
from connector.ops import looplag, metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "natsconn" / "dashboards" / "natsconn.json"

# Families without a pipeline label: the process's, not a pipeline's.
PROCESS_WIDE = ("natsconn_reloads_total", "natsconn_event_loop_lag_", "natsconn_gc_pause_")

# PromQL words that look like metric names in an expression but are not.
PROMQL = {
    "sum", "min", "max", "avg", "count", "by", "without", "rate", "irate", "increase",
    "histogram_quantile", "changes", "label_values", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "bool", "offset", "topk", "bottomk", "delta",
    "deriv", "clamp_min", "clamp_max", "abs", "vector", "scalar", "time",
}


def exported() -> dict[str, tuple[str, frozenset[str]]]:
    """Every sample name natsconn's registry exports -> (family, its label names):
    a counter as <name>_total, a histogram as <name>_bucket/_sum/_count (and ``le``)."""
    wrappers: list[MetricWrapperBase] = [
        v for mod in (metrics, reload, looplag) for v in vars(mod).values()
        if isinstance(v, MetricWrapperBase)]
    assert reload.RELOADS in wrappers
    out: dict[str, tuple[str, frozenset[str]]] = {}
    registered = {m.name for m in metrics.REGISTRY.collect()}
    for w in wrappers:
        family = w._name
        assert family in registered, f"{family} is not in metrics.REGISTRY"
        labels = frozenset(w._labelnames)
        if isinstance(w, Counter):
            out[f"{family}_total"] = (family, labels)
        elif isinstance(w, Histogram):
            for suffix in ("_sum", "_count"):
                out[family + suffix] = (family, labels)
            out[f"{family}_bucket"] = (family, labels | {"le"})
        elif isinstance(w, Gauge):
            out[family] = (family, labels)
        else:  # pragma: no cover - a new metric type: teach this test about it
            raise AssertionError(f"unexpected metric type {type(w)} of {family}")
    return out


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels() -> list[dict[str, Any]]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold theirs
    return out


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every query: panel targets, variables, annotations."""
    doc = dashboard()
    out = [(p["title"], t["expr"]) for p in panels() for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append((f"variable {var['name']}", q["query"] if isinstance(q, dict) else q))
    out += [(f"annotation {a['name']}", a["expr"]) for a in doc["annotations"]["list"]
            if "expr" in a]
    return out


def metric_names(expr: str) -> set[str]:
    """Identifiers of an expression that name series: not functions, keywords,
    label names, durations or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", text)  # (metric, label)
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges ($__rate_interval, 5m)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w not in PROMQL}


def label_names(expr: str) -> set[str]:
    """Label names the expression groups by or matches on."""
    out: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        out |= {g.strip() for g in group.split(",") if g.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        out |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    label_values = re.search(r"label_values\([^,]+,\s*(\w+)\)", expr)
    if label_values:
        out.add(label_values.group(1))
    return out


def test_the_parser_finds_names_and_labels() -> None:
    expr = ('histogram_quantile(0.99, sum by (pipeline, le) (rate(natsconn_write_seconds_bucket'
            '{pipeline=~"$pipeline", x="a{b}"}[$__rate_interval]))) / ignoring(le) '
            'natsconn_up_total')
    assert metric_names(expr) == {"natsconn_write_seconds_bucket", "natsconn_up_total"}
    assert label_names(expr) == {"pipeline", "le", "x"}
    assert metric_names("label_values(natsconn_pipeline_up, pipeline)") == {
        "natsconn_pipeline_up"}


def test_every_query_names_only_exported_metrics() -> None:
    known = exported()
    used: set[str] = set()
    unknown = []
    for where, expr in expressions():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        used |= names
        unknown += [(where, n) for n in sorted(names) if n not in known]
    assert unknown == [], f"queries name metrics natsconn does not export: {unknown}"
    # The dashboard covers what the issue asks for.
    for family in ("natsconn_messages_in_total", "natsconn_messages_out_total",
                   "natsconn_sink_messages_out_total", "natsconn_write_seconds_bucket",
                   "natsconn_in_flight_messages", "natsconn_source_lag",
                   "natsconn_retries_total", "natsconn_dead_lettered_total",
                   "natsconn_filtered_total", "natsconn_pipeline_restarts_total",
                   "natsconn_reloads_total", "natsconn_dropped_total",
                   "natsconn_batch_stage_seconds_bucket", "natsconn_event_loop_lag_seconds_bucket",
                   "natsconn_gc_pause_seconds_bucket"):
        assert family in used, f"no panel queries {family}"


def test_every_query_uses_labels_its_metrics_have() -> None:
    known = exported()
    wrong = []
    for where, expr in expressions():
        have: set[str] = set()
        for name in metric_names(expr):
            have |= known[name][1] if name in known else set()
        wrong += [(where, label) for label in sorted(label_names(expr) - have)]
    assert wrong == [], f"queries use labels their metrics lack: {wrong}"


def test_histogram_quantiles_use_buckets_and_keep_le() -> None:
    for where, expr in expressions():
        if "histogram_quantile" not in expr:
            continue
        assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), (where, expr)


@pytest.mark.parametrize("title", [
    "Messages in / out per pipeline", "Written per sink", "Write latency p50 / p99",
    "In flight", "Source lag", "Retries", "Dead-lettered", "Filtered",
    "Restarts after failures", "Reloads", "Dropped",
    "Where the oldest message of a batch waits (p99)", "Event loop lag and collector pauses",
])
def test_the_promised_panels_are_there(title: str) -> None:
    assert title in {p["title"] for p in panels()}


def test_the_dashboard_is_well_formed() -> None:
    doc = dashboard()
    assert doc["uid"] == "natsconn" and doc["title"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    names = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "pipeline"} <= names
    for p in panels():
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        assert [t["refId"] for t in p["targets"]] == [chr(65 + i)
                                                     for i in range(len(p["targets"]))]
        for t in p["targets"]:
            if not any(family in t["expr"] for family in PROCESS_WIDE):
                assert 'pipeline=~"$pipeline"' in t["expr"], (p["title"], t["expr"])
    # No two panels overlap on the grid.
    cells: set[tuple[int, int]] = set()
    for p in panels():
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_docs_point_at_the_dashboard() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "helm/natsconn/dashboards/natsconn.json" in text
