"""``natsconn validate`` as a user runs it: a subprocess, its exit code and output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_config import BROKEN, BROKEN_CASES, EXPRESSION_COLUMNS, REPO

NATSCONN = Path(sys.executable).with_name("natsconn")
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def validate(*files: Path | str, env: dict[str, str] | None = None,
             cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NATSCONN_EXAMPLE_")}
    environ.update(env or {})
    return subprocess.run(
        [str(NATSCONN), "validate", *map(str, files)],
        capture_output=True, text=True, timeout=60, env=environ, cwd=cwd,
    )


def test_the_console_script_is_installed() -> None:
    assert NATSCONN.exists(), f"{NATSCONN} missing: pip install -e . into the venv"


@pytest.mark.parametrize("name", sorted(BROKEN_CASES))
def test_broken_file_prints_one_error_with_file_line_and_exits_2(name: str) -> None:
    line = BROKEN_CASES[name][0]
    rel = f"examples/broken/{name}"
    result = validate(rel)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, result.stderr
    column = EXPRESSION_COLUMNS.get(name)
    where = f"{line}:{column}" if column is not None else f"{line}"
    assert errors[0].startswith(f"error: {rel}:{where}: "), errors[0]
    assert result.stdout == ""
    assert result.stderr.strip() == errors[0], "nothing but the one error line"


def test_several_files_give_one_error_each_and_exit_2() -> None:
    names = ["wrong-type.yaml", "unknown-key.yaml"]
    result = validate(*(BROKEN / n for n in names), *EXAMPLES)
    assert result.returncode == 2
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert [e.split(":")[1].strip().rsplit("/", 1)[-1] for e in errors] == names
    assert result.stdout.count(": valid (") == len(EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_valid_examples_validate(example: Path) -> None:
    result = validate(example)
    assert result.returncode == 0, result.stderr
    assert re.match(rf"^{re.escape(str(example))}: valid \(\d+ pipeline\(s\): ", result.stdout)
    assert result.stderr == ""


def test_there_are_valid_examples() -> None:
    assert EXAMPLES, "examples/*.yaml: at least the quickstart is expected"


# ---------------------------------------------------------------- secrets


PASSWORD = "pw-5b1e-never-print-me"


def test_password_never_appears_in_validate_output(tmp_path: Path) -> None:
    path = tmp_path / "with-password.yaml"
    path.write_text(f"""\
pipelines:
  - name: secured
    source: {{type: generate, count: 1}}
    sink:
      type: nats
      user: bridge
      password: {PASSWORD}
      servers: ["nats://bridge:{PASSWORD}@127.0.0.1:4222"]
""")
    result = validate(path)
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_password_never_appears_in_the_error_for_a_broken_file() -> None:
    result = validate(BROKEN / "secret-wrong-type.yaml")
    assert result.returncode == 2
    text = (BROKEN / "secret-wrong-type.yaml").read_text()
    password = re.search(r"password: (\S+)", text)
    assert password is not None
    assert password.group(1) not in result.stdout + result.stderr


@pytest.mark.parametrize("body", [
    # the password itself has the wrong type
    "      password: 99887766554433\n",
    # the password sits in a URL in a field with the wrong type
    "      servers: nats://bridge:99887766554433@127.0.0.1:4222\n",
    # the password comes from a file and lands in a field with the wrong type
    "      servers: ${file:SECRET_FILE}\n",
])
def test_broken_secret_is_not_echoed(tmp_path: Path, body: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("99887766554433\n")
    path = tmp_path / "broken.yaml"
    path.write_text("pipelines:\n  - name: a\n    source: {type: generate}\n    sink:\n"
                    "      type: nats\n" + body.replace("SECRET_FILE", str(secret_file)))
    result = validate(path)
    assert result.returncode == 2, result.stdout
    assert f"{path}:6: " in result.stderr
    assert "99887766554433" not in result.stdout + result.stderr
