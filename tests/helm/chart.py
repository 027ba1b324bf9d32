"""Helpers of the chart tests: Helm from ``scripts/helm``, rendering, and the pod a
rendered Deployment would run, replayed on this machine.

Helm is built with ``go install`` by ``scripts/helm`` when it is missing; a failed
build fails the tests (it is never a skip).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "natsconn"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
HELM_WRAPPER = REPO / "scripts" / "helm"
NATSCONN = str(Path(sys.executable).with_name("natsconn"))
# A fixed Kubernetes version for rendering: the result does not depend on how Helm was
# built (a Helm built without its Makefile's flags assumes 1.20, below the chart's floor).
KUBE_VERSION = "1.30.0"
RELEASE = "rel"
NAMESPACE = "natsconn"


def install_helm() -> Path:
    """Path of the Helm binary, built by ``scripts/helm`` if missing."""
    proc = subprocess.run([str(HELM_WRAPPER), "--install-only"], capture_output=True,
                          text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"scripts/helm could not install Helm (exit {proc.returncode}):"
                             f"\n{proc.stdout}\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Helm:
    binary: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HELM_CACHE_HOME": "/tmp/natsconn-helm-cache",
               "HELM_CONFIG_HOME": "/tmp/natsconn-helm-config",
               "HELM_DATA_HOME": "/tmp/natsconn-helm-data"}
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              timeout=120, check=False, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed (exit {proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def template_args(self, values: Sequence[Path] = (), sets: Sequence[str] = ()) -> list[str]:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                "--kube-version", KUBE_VERSION]
        for path in values:
            args += ["-f", str(path)]
        for item in sets:
            args += ["--set", item]
        return args

    def render(self, values: Sequence[Path] = (), sets: Sequence[str] = ()) -> Manifests:
        out = self.run(*self.template_args(values, sets)).stdout
        return Manifests([d for d in yaml.safe_load_all(out) if d])


@dataclass(frozen=True)
class Manifests:
    docs: list[dict[str, Any]]

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def get(self, kind: str) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, rendered {self.kinds()}"
        return found[0]

    def has(self, kind: str) -> bool:
        return any(d["kind"] == kind for d in self.docs)

    @property
    def pod(self) -> dict[str, Any]:
        return dict(self.get("Deployment")["spec"]["template"]["spec"])

    def container(self, name: str = "natsconn") -> dict[str, Any]:
        pod = self.pod
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            if c["name"] == name:
                return dict(c)
        raise AssertionError(f"no container {name!r} in the Deployment")

    def config_maps(self) -> list[dict[str, Any]]:
        """The ConfigMaps holding the pipeline file (not the Grafana dashboard's)."""
        return [d for d in self.docs if d["kind"] == "ConfigMap"
                and "pipeline.yaml" in d.get("data", {})]

    def pipeline_text(self) -> str:
        (config,) = self.config_maps()
        return str(config["data"]["pipeline.yaml"])


def config_file_path(m: Manifests, container: dict[str, Any]) -> str:
    """Where the container sees the pipeline file: the ``config`` volume's mount path
    joined with the ConfigMap item's path."""
    mount = next(v for v in container["volumeMounts"] if v["name"] == "config")
    volume = next(v for v in m.pod["volumes"] if v["name"] == "config")
    items = volume["configMap"]["items"]
    assert len(items) == 1, items
    return f"{mount['mountPath'].rstrip('/')}/{items[0]['path']}"


# ------------------------------------------------- the pod, replayed on this host


SECRET_PREFIX = "from-secret-"


def secret_value(secret: str, key: str) -> str:
    """The value a test pretends an existing Secret holds."""
    return f"{SECRET_PREFIX}{secret}-{key}"


def pod_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment with Secret and downward-API values filled in."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secret_value(ref["name"], ref["key"])
        elif "fieldRef" in source:
            env[var["name"]] = f"pod-{source['fieldRef']['fieldPath'].replace('.', '-')}"
        else:
            raise AssertionError(f"env {var['name']}: unexpected source {source}")
    return env


def replay_mounts(m: Manifests, container: Mapping[str, Any], root: Path,
                  text: str) -> str:
    """Make the container's Secret mounts real under ``root`` and point ``text`` (the
    pipeline file) at them.

    Each Secret volume becomes a directory holding the items the volume names, plus
    every file the pipeline text references below its mount path; the mount path in
    the text is rewritten to that directory. This stands in for the kubelet: the
    validation that follows then finds exactly the files a pod would have.
    """
    volumes = {v["name"]: v for v in m.pod["volumes"]}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        path = mount["mountPath"].rstrip("/")
        local = root / mount["name"]
        local.mkdir(parents=True)
        names = {item["path"] for item in secret.get("items", [])}
        names |= set(re.findall(re.escape(path) + r"/([A-Za-z0-9._-]+)", text))
        for name in names:
            (local / name).write_text(secret_value(secret["secretName"], name) + "\n")
        text = text.replace(path + "/", f"{local}/")
    return text


def validate_pipeline(file: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``natsconn validate FILE`` with exactly ``env`` (plus PATH and HOME)."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run([NATSCONN, "validate", str(file)], capture_output=True, text=True,
                          timeout=60, check=False, env={**base, **env})


def value_paths(values: Mapping[str, Any], opaque: Iterable[str], prefix: str = "") -> set[str]:
    """Dotted paths of the leaves of ``values``; keys in ``opaque`` count as leaves."""
    out: set[str] = set()
    skip = set(opaque)
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in skip:
            out |= value_paths(value, skip, path + ".")
        else:
            out.add(path)
    return out
