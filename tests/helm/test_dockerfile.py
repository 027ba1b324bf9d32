"""Issue 6: the Dockerfile, checked statically (no Docker engine runs here): the user,
the entrypoint, the extras, the port and the config path agree with pyproject.toml,
the runtime and the chart; its build stage, replayed with pip, yields a wheel that
carries every built-in plugin."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from connector.cli import _parser
from connector.config.model import HttpSettings

from .chart import CHART, REPO, Helm, config_file_path

DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str


def _instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        name, _, args = current.partition(" ")
        out.append(Instruction(name.upper(), args.strip()))
        current = ""
    return out


INSTRUCTIONS = _instructions(DOCKERFILE.read_text())


def _stages() -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for ins in INSTRUCTIONS:
        if ins.name == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


STAGES = _stages()
FINAL = STAGES[-1]


def _global_args() -> dict[str, str]:
    """ARGs before the first FROM, with their defaults."""
    out: dict[str, str] = {}
    for ins in INSTRUCTIONS:
        if ins.name == "FROM":
            break
        if ins.name == "ARG":
            name, _, default = ins.args.partition("=")
            out[name] = default
    return out


def _one(stage: list[Instruction], name: str) -> Instruction:
    found = [i for i in stage if i.name == name]
    assert len(found) == 1, f"expected one {name} in the final stage, found {found}"
    return found[0]


def _exec_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), ins
    return value


def test_multi_stage_on_slim_python() -> None:
    assert len(STAGES) >= 2
    args = _global_args()
    python = args["PYTHON_VERSION"]
    assert python == "3.11"
    # BASE_IMAGE (empty by default) replaces the base where no registry is reachable
    # (scripts/image); by default both stages build on python:3.11-slim.
    assert args["BASE_IMAGE"] == ""
    for stage in STAGES:
        image = stage[0].args.split()[0]
        assert image == "${BASE_IMAGE:-python:${PYTHON_VERSION}-slim}", image
        image = image.replace("${PYTHON_VERSION}", python)
        assert re.fullmatch(r"\$\{BASE_IMAGE:-(.+)\}", image).group(1) == "python:3.11-slim"
    assert "AS build" in STAGES[0][0].args
    requires = PYPROJECT["project"]["requires-python"]
    assert requires == ">=3.11", requires


def test_the_build_stage_makes_a_wheel_and_the_final_stage_installs_it() -> None:
    build_runs = " ".join(i.args for i in STAGES[0] if i.name == "RUN")
    assert "pip wheel" in build_runs
    final_runs = " ".join(i.args for i in FINAL if i.name == "RUN")
    assert "from=build" in final_runs and "pip install" in final_runs
    assert 'natsconn[$EXTRAS] @ file://$wheel' in final_runs


def test_runs_as_the_charts_non_root_user() -> None:
    user = _one(FINAL, "USER").args
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without the image's passwd.
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user
    pod = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))
    runs = " ".join(i.args for i in FINAL if i.name == "RUN")
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs
    # USER comes after every RUN: nothing after it runs as root.
    names = [i.name for i in FINAL]
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN")


def test_entrypoint_is_the_natsconn_console_script() -> None:
    assert _exec_form(_one(FINAL, "ENTRYPOINT")) == ["natsconn"]
    assert PYPROJECT["project"]["scripts"]["natsconn"] == "connector.cli:main"


def test_the_extras_it_installs_exist() -> None:
    extras_arg = next(i.args for i in FINAL if i.name == "ARG" and i.args.startswith("EXTRAS"))
    default = extras_arg.partition("=")[2]
    assert default == "all"
    known = set(PYPROJECT["project"]["optional-dependencies"])
    assert {"kafka", "redis", "postgres", "all"} <= known
    # The default, and every extra the header comment offers.
    (offered,) = re.findall(r"plugin extras: ([a-z, ]+)\n", DOCKERFILE.read_text())
    named = {default} | {e.strip() for e in offered.split(",")}
    assert len(named) >= 4
    assert named - known == set(), f"extras not in pyproject.toml: {named - known}"
    # `all` pulls in every plugin extra (and may add optional helpers such as
    # kafka-compression).
    (everything,) = PYPROJECT["project"]["optional-dependencies"]["all"]
    pulled = set(re.fullmatch(r"natsconn\[([a-z,-]+)\]", everything).group(1).split(","))
    assert {"kafka", "redis", "postgres"} <= pulled <= known


def test_exposed_port_matches_the_runtime_and_the_chart(helm: Helm) -> None:
    exposed = int(_one(FINAL, "EXPOSE").args)
    assert exposed == int(HttpSettings().address.rpartition(":")[2])
    container = helm.render().container("natsconn")
    assert container["ports"][0]["containerPort"] == exposed


def test_cmd_reads_the_file_the_chart_mounts(helm: Helm) -> None:
    cmd = _exec_form(_one(FINAL, "CMD"))
    args = _parser().parse_args(cmd)
    assert args.command == "run"
    m = helm.render()
    assert args.file == config_file_path(m, m.container("natsconn"))


def _dockerignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/")
               for p in patterns)


def _build_context_copies() -> list[str]:
    sources: list[str] = []
    for ins in STAGES[0]:
        if ins.name == "COPY" and "--from" not in ins.args:
            sources += ins.args.split()[:-1]
    return sources


def test_build_stage_replayed_yields_a_wheel_with_every_plugin(tmp_path: Path) -> None:
    """COPY what the build stage copies (minus .dockerignore) into a fresh directory and
    run its `pip wheel`; the wheel must hold every package and plugin entry point of
    pyproject.toml."""
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    context = tmp_path / "context"
    context.mkdir()
    for source in _build_context_copies():
        assert not _dockerignored(source, ignore), f"{source} is excluded by .dockerignore"
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, context / source)
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--wheel-dir", str(wheels), "."], cwd=context, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheels.glob("natsconn-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/", 1)[0] for n in names}
        entry_points = next(z.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    plugin_dirs = {p.name for p in (REPO / "plugins").iterdir()
                   if (p / "__init__.py").is_file()}
    assert {"connector", *plugin_dirs} <= tops, tops
    for group in ("natsconn.sources", "natsconn.sinks", "natsconn.transforms"):
        declared = PYPROJECT["project"]["entry-points"][group]
        for name, target in declared.items():
            assert f"{name} = {target}" in entry_points, (group, name)
    assert "natsconn = connector.cli:main" in entry_points


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "connector", "plugins"])
def test_dockerignore_keeps_what_the_build_needs(path: str) -> None:
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert path in _build_context_copies()
    assert not _dockerignored(path, ignore)
