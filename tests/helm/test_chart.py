"""Issue 6: the chart lints, renders valid Kubernetes objects for the default values and
every ci/ values file, and agrees with what ``natsconn`` reads and serves."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions

from connector.cli import _parser
from connector.config.loader import load_text
from connector.config.model import HttpSettings

from .chart import (
    CHART,
    CI_VALUES,
    NATSCONN,
    Helm,
    config_file_path,
    pod_env,
    replay_mounts,
    secret_value,
    validate_pipeline,
    value_paths,
)

VALUES_CASES = [pytest.param(None, id="default"),
                *(pytest.param(p, id=p.stem) for p in CI_VALUES)]
# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships.
KUBE_SCHEMAS = [all_versions()[0], all_versions()[-1]]
CRDS = {"ServiceMonitor"}  # not in Kubernetes' own schemas; checked by hand below


def _values(path: Path | None) -> list[Path]:
    return [] if path is None else [path]


def _runtime_port() -> int:
    return int(HttpSettings().address.rpartition(":")[2])


def test_ci_values_files_are_the_ones_issue_6_asks_for() -> None:
    assert {p.name for p in CI_VALUES} >= {"kafka-sasl-values.yaml", "scale-values.yaml",
                                           "existing-configmap-values.yaml"}


# ------------------------------------------------------------------ lint, render


@pytest.mark.parametrize("values", VALUES_CASES)
def test_helm_lint_is_clean(helm: Helm, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + [a for p in _values(values) for a in ("-f", str(p))]
    proc = helm.run(*args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "0 chart(s) failed" in out, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out
    # lint logs a template's `fail` as INFO instead of failing: none may fire.
    assert "Fail:" not in out, out


@pytest.mark.parametrize("values", VALUES_CASES)
def test_rendered_manifests_match_kubernetes_schemas(helm: Helm, values: Path | None) -> None:
    m = helm.render(_values(values))
    assert {"Deployment", "ServiceAccount", "Service", "PodDisruptionBudget"} <= set(m.kinds())
    checked = 0
    for doc in m.docs:
        if doc["kind"] in CRDS:
            continue
        for version in KUBE_SCHEMAS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                raise AssertionError(f"{doc['kind']} {doc['metadata']['name']} is invalid "
                                     f"for Kubernetes {version} at {path}: {exc.message}"
                                     ) from None
            except SchemaNotFoundError as exc:
                raise AssertionError(exc.message) from None
            checked += 1
    assert checked >= 2 * 4


def test_service_monitor_scrapes_the_service_port(helm: Helm) -> None:
    m = helm.render(sets=["metrics.serviceMonitor.enabled=true"])
    monitor, service = m.get("ServiceMonitor"), m.get("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert not helm.render().has("ServiceMonitor")


# ------------------------------------------------ agreement with natsconn itself


def test_container_args_parse_with_natsconn_and_name_the_mounted_file(helm: Helm) -> None:
    m = helm.render()
    main = m.container("natsconn")
    args = _parser().parse_args(main["args"])
    assert args.command == "run"
    assert args.file == config_file_path(m, main) == "/etc/natsconn/pipeline.yaml"
    assert args.log_format == "json"
    host, _, port = args.http_address.rpartition(":")
    (container_port,) = main["ports"]
    assert (host, int(port)) == ("0.0.0.0", container_port["containerPort"])
    assert container_port["containerPort"] == _runtime_port() == 8080
    assert container_port["name"] == "http"

    init = m.container("validate-config")
    init_args = _parser().parse_args(init["args"])
    assert init_args.command == "validate"
    assert init_args.file == [config_file_path(m, init)]
    assert init["image"] == main["image"]
    assert init["env"] == main["env"] and init["volumeMounts"] == main["volumeMounts"]


def test_pod_name_comes_from_the_downward_api(helm: Helm) -> None:
    env = {e["name"]: e for e in helm.render().container("natsconn")["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_probes_and_service_use_the_http_port(helm: Helm) -> None:
    m = helm.render()
    main = m.container("natsconn")
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    (port,) = m.get("Service")["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == _runtime_port()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return 0, b""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: natsconn\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return (int(head.split(b" ", 2)[1]) if head else 0), body


async def test_natsconn_serves_the_probe_paths_when_run_with_the_rendered_args(
        helm: Helm, tmp_path: Path) -> None:
    """The rendered container command, run for real: only the file's location and the
    listen address are moved to this machine (a free loopback port)."""
    m = helm.render()
    main = m.container("natsconn")
    file = tmp_path / "pipeline.yaml"
    file.write_text(m.pipeline_text(), encoding="utf-8")
    port = _free_port()
    rendered_address = f"0.0.0.0:{main['ports'][0]['containerPort']}"
    args = [str(file) if a == config_file_path(m, main)
            else f"127.0.0.1:{port}" if a == rendered_address else a for a in main["args"]]
    assert args.count(str(file)) == 1 and args.count(f"127.0.0.1:{port}") == 1, args
    log = tmp_path / "natsconn.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            NATSCONN, *args, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
            env={**pod_env(main), "PATH": "/usr/bin:/bin"})
    try:
        status = 0
        for _ in range(100):
            status, _body = await _get(port, main["livenessProbe"]["httpGet"]["path"])
            if status or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert status == 200, f"liveness probe got {status}; log:\n{log.read_text()}"
        # The default pipeline's NATS host (nats:4222) does not exist here: not ready.
        status, body = await _get(port, main["readinessProbe"]["httpGet"]["path"])
        assert status == 503, (status, body)
        assert b"orders-to-archive" in body
        status, body = await _get(port, "/metrics")
        assert status == 200 and b"natsconn_pipeline_up" in body
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 40)


@pytest.mark.parametrize("values", [
    pytest.param(None, id="default"),
    *(pytest.param(p, id=p.stem) for p in CI_VALUES if "existing-configmap" not in p.name),
])
def test_rendered_pipeline_file_passes_natsconn_validate(
        helm: Helm, values: Path | None, tmp_path: Path) -> None:
    """The ConfigMap's file, with the env and Secret files a pod would have, is valid."""
    m = helm.render(_values(values))
    init = m.container("validate-config")
    text = replay_mounts(m, init, tmp_path / "mounts", m.pipeline_text())
    file = tmp_path / "pipeline.yaml"
    file.write_text(text, encoding="utf-8")
    proc = validate_pipeline(file, pod_env(init))
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout


def test_validate_init_container_stops_a_pod_whose_secret_is_missing(
        helm: Helm, tmp_path: Path) -> None:
    """What the init container prints when a Secret-backed variable is absent."""
    m = helm.render([CHART / "ci" / "kafka-sasl-values.yaml"])
    init = m.container("validate-config")
    file = tmp_path / "pipeline.yaml"
    file.write_text(replay_mounts(m, init, tmp_path / "mounts", m.pipeline_text()))
    env = pod_env(init)
    del env["KAFKA_SASL_PASSWORD"]
    proc = validate_pipeline(file, env)
    assert proc.returncode == 2
    assert "undefined variable KAFKA_SASL_PASSWORD" in proc.stderr


# ------------------------------------------------------------------------ secrets


def test_secrets_reach_the_pipeline_but_never_the_configmap(
        helm: Helm, tmp_path: Path) -> None:
    m = helm.render([CHART / "ci" / "kafka-sasl-values.yaml"])
    assert not m.has("Secret"), "the chart must never create a Secret"
    main = m.container("natsconn")
    env = {e["name"]: e["valueFrom"] for e in main["env"] if "valueFrom" in e}
    assert env["KAFKA_SASL_PASSWORD"] == {
        "secretKeyRef": {"name": "kafka-sasl", "key": "password"}}
    text = m.pipeline_text()
    assert yaml.safe_load(text)["pipelines"][0]["sink"]["password"] == "${KAFKA_SASL_PASSWORD}"

    # In the pod, the reference resolves to the Secret's value; the value is nowhere
    # in what the chart renders.
    password = secret_value("kafka-sasl", "password")
    assert password not in yaml.safe_dump_all(m.docs)
    loaded = load_text(replay_mounts(m, main, tmp_path, text), "pipeline.yaml",
                       env=pod_env(main))
    sink = loaded.pipelines[0].sink.config
    assert sink.password.get_secret_value() == password  # type: ignore[attr-defined]
    assert password in loaded.secrets  # so natsconn's logs redact it

    volumes = {v["name"]: v for v in m.pod["volumes"]}
    for name, secret in (("kafka-tls", "kafka-tls"), ("nats-creds", "nats-creds")):
        assert volumes[name]["secret"]["secretName"] == secret
        mount = next(v for v in main["volumeMounts"] if v["name"] == name)
        assert mount["readOnly"] is True
        assert mount["mountPath"] == f"/var/run/secrets/natsconn/{name}"
        assert mount["mountPath"] in text


@pytest.mark.parametrize(("pipeline_source", "message"), [
    ({"type": "jetstream", "stream": "S", "password": "hunter2"},
     "pipeline.pipelines[0].source.password holds a literal secret"),
    ({"type": "jetstream", "stream": "S", "token": "hunter2"},
     "pipeline.pipelines[0].source.token holds a literal secret"),
    ({"type": "jetstream", "stream": "S", "servers": ["nats://u:hunter2@nats:4222"]},
     "pipeline.pipelines[0].source.servers[0] has a password written inside a URL"),
    ({"type": "redis_stream", "url": "redis://default:hunter2@redis:6379", "streams": ["s"]},
     "pipeline.pipelines[0].source.url has a password written inside a URL"),
], ids=["password", "token", "nats-url", "redis-url"])
def test_literal_secrets_in_the_pipeline_are_refused(
        helm: Helm, tmp_path: Path, pipeline_source: dict[str, Any], message: str) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"pipeline": {"pipelines": [{
        "name": "p", "source": pipeline_source, "sink": {"type": "nats", "subject": "x"}}]}}))
    proc = helm.run(*helm.template_args([values]), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stdout


def test_references_inside_urls_and_dsns_are_accepted(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"pipeline": {"pipelines": [{
        "name": "p",
        "source": {"type": "redis_stream", "url": "redis://default:${REDIS_PASSWORD}@r:6379",
                   "streams": ["s"]},
        "sink": {"type": "postgres", "dsn": "host=pg user=n password=${PGPASSWORD}",
                 "table": "t"}}]}}))
    text = helm.render([values]).pipeline_text()
    assert "redis://default:${REDIS_PASSWORD}@r:6379" in text
    assert "password=${PGPASSWORD}" in text


# ------------------------------------------------------------------ values schema


@pytest.mark.parametrize(("values", "fragments"), [
    ({"replicaCount": "three"}, ["/replicaCount", "got string, want integer"]),
    ({"replicaCount": -1}, ["/replicaCount", "minimum"]),
    ({"replicas": 3}, ["additional properties 'replicas' not allowed"]),
    ({"http": {"port": 70000}}, ["/http/port", "maximum"]),
    ({"logFormat": "xml"}, ["/logFormat", "json", "console"]),
    ({"secretEnv": [{"name": "X", "secretName": "s"}]}, ["/secretEnv/0", "key"]),
    ({"pipeline": {"pipelines": []}}, ["/pipeline/pipelines", "minItems"]),
], ids=["replicas-three", "replicas-negative", "typo", "port", "log-format",
        "secret-env-key", "no-pipelines"])
def test_invalid_values_are_rejected_by_the_schema(
        helm: Helm, tmp_path: Path, values: dict[str, Any], fragments: list[str]) -> None:
    file = tmp_path / "bad-values.yaml"
    file.write_text(yaml.safe_dump(values))
    for args in (helm.template_args([file]), ["lint", "--strict", str(CHART), "-f", str(file)]):
        proc = helm.run(*args, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out
        assert "values don't meet the specifications of the schema" in out, out
        for fragment in fragments:
            assert fragment in out, out


def test_replicas_three_message_is_clear(helm: Helm, tmp_path: Path) -> None:
    file = tmp_path / "bad-values.yaml"
    file.write_text('replicaCount: "three"\n')
    proc = helm.run(*helm.template_args([file]), check=False)
    assert proc.stderr.strip().splitlines()[-1].strip() == (
        "- at '/replicaCount': got string, want integer"), proc.stderr


# ------------------------------------------------------------- the other choices


def test_existing_configmap_replaces_the_charts_own(helm: Helm) -> None:
    m = helm.render([CHART / "ci" / "existing-configmap-values.yaml"])
    assert m.config_maps() == []
    (config,) = (v for v in m.pod["volumes"] if v["name"] == "config")
    assert config["configMap"] == {"name": "natsconn-pipelines",
                                   "items": [{"key": "orders.yaml", "path": "pipeline.yaml"}]}
    assert config_file_path(m, m.container("natsconn")) == "/etc/natsconn/pipeline.yaml"
    mounts = {v["name"]: v["mountPath"] for v in m.container("natsconn")["volumeMounts"]}
    assert mounts["nats-tls"] == "/etc/natsconn-tls"


def test_a_changed_pipeline_changes_the_checksum_annotation(helm: Helm) -> None:
    def checksum(*sets: str) -> str:
        pod = helm.render(sets=list(sets)).get("Deployment")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/config"])

    base = checksum()
    assert checksum() == base
    assert checksum("pipeline.shutdown_timeout=10s") != base
    assert checksum("replicaCount=2") == base


def test_scale_values_hpa_owns_the_replica_count(helm: Helm) -> None:
    m = helm.render([CHART / "ci" / "scale-values.yaml"])
    assert "replicas" not in m.get("Deployment")["spec"]
    hpa = m.get("HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 6)
    assert hpa["scaleTargetRef"]["name"] == m.get("Deployment")["metadata"]["name"]
    assert m.get("PodDisruptionBudget")["spec"] == {
        "minAvailable": 2, "selector": m.get("Deployment")["spec"]["selector"]}
    pod = m.pod
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "podAntiAffinity" in pod["affinity"]
    env = {e["name"] for e in m.container("natsconn")["env"]}
    assert {"TZ", "NATS_PASSWORD", "POD_NAME"} <= env

    fixed = helm.render([CHART / "ci" / "scale-values.yaml"],
                        sets=["autoscaling.enabled=false"])
    assert fixed.get("Deployment")["spec"]["replicas"] == 3
    assert not fixed.has("HorizontalPodAutoscaler")


def test_pods_run_locked_down(helm: Helm) -> None:
    m = helm.render()
    pod = m.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for name in ("natsconn", "validate-config"):
        sc = m.container(name)["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert "resources" in m.container(name)
    assert m.container("natsconn")["resources"]["limits"]["memory"]
    # Longer than natsconn's graceful stop, so in-flight batches finish on SIGTERM.
    text = m.pipeline_text()
    timeout = load_text(text, "pipeline.yaml").spec.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > timeout


def test_disabled_http_endpoint_is_refused(helm: Helm) -> None:
    proc = helm.run(*helm.template_args(sets=["pipeline.http.enabled=false"]), check=False)
    assert proc.returncode != 0
    assert "pipeline.http.enabled is false" in proc.stderr


def test_notes_warn_when_replicas_would_each_get_every_message(
        helm: Helm, tmp_path: Path) -> None:
    """NOTES.txt is not rendered by `helm template`: render it through a probe
    template in a copy of the chart."""
    chart = tmp_path / "natsconn"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ include "natsconn/templates/NOTES.txt" . | quote }}\n')

    def notes(values: dict[str, Any]) -> str:
        file = tmp_path / "v.yaml"
        file.write_text(yaml.safe_dump(values))
        out = helm.run("template", "rel", str(chart), "--kube-version", "1.30.0",
                       "-f", str(file), "-s", "templates/zz-notes-probe.yaml").stdout
        return str(yaml.safe_load(out)["data"]["notes"])

    def pipeline(source: dict[str, Any]) -> dict[str, Any]:
        return {"pipelines": [{"name": "p", "source": source,
                               "sink": {"type": "nats", "subject": "y"}}]}

    core = pipeline({"type": "nats", "subjects": ["x"]})
    assert "natsconn/templates" not in notes({"pipeline": core})
    assert "WARNING" not in notes({"pipeline": core})
    warned = notes({"replicaCount": 3, "pipeline": core})
    assert "WARNING: pipeline p reads from a nats source without queue_group" in warned
    assert "each\none 3 times" in warned
    grouped = pipeline({"type": "nats", "subjects": ["x"], "queue_group": "q"})
    assert "WARNING" not in notes({"replicaCount": 3, "pipeline": grouped})
    assert "WARNING" in notes({"replicaCount": 2,
                               "pipeline": pipeline({"type": "redis_pubsub"})})
    assert "port-forward svc/rel-natsconn 8080:8080" in notes({})


# --------------------------------------------------------------------- the README


def test_readme_values_table_matches_values_yaml() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    opaque = {"pipeline", "podSecurityContext", "securityContext", "resources",
              "livenessProbe", "readinessProbe", "strategy", "validateConfig.resources",
              "autoscaling.behavior"}
    paths = value_paths(values, opaque)
    readme = (CHART / "README.md").read_text()
    table = readme.split("## Values", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented: set[str] = set()
    for row in rows:
        first = row.split("|")[1]
        documented |= {part.strip().strip("`") for part in first.split(",")}
    assert paths - documented == set(), "values without a row in the README table"
    assert documented - paths == set(), "README rows for values that do not exist"


def test_schema_knows_every_top_level_value() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_helm_wrapper_runs_helm(helm: Helm) -> None:
    proc = subprocess.run([str(CHART.parents[1] / "scripts" / "helm"), "version", "--short"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.startswith("v3."), proc.stdout
