"""A planted secret never shows: not in ``natsconn validate`` output (valid files
and broken ones), not in the logs of ``natsconn run`` (JSON and console, debug
level) against servers that refuse the credentials or do not answer, not in
/metrics or /readyz, and not in the text of any exception a pipeline raises
(checked in-process, before the log formatter's redaction could hide it).

Every secret-bearing option of every installed plugin gets its own unique
secret: each SecretStr field (found by walking the plugins' Config models, so a
new secret option fails this test until it is planted here), URL userinfo
(``nats://user:pw@``, ``nats://token@``, ``redis://user:pw@``, the DSN's
password), ``${file:...}`` and ``${VAR}`` values, and a creds file's contents.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import traceback
import typing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from integration.helpers import NATSCONN, free_port, natsconn_process, pipeline_file, wait_until
from pydantic import BaseModel, SecretStr

from connector.config.loader import load_file
from connector.engine.supervisor import Supervisor
from connector.registry import Kind, Registry

from .support import log_records

pytestmark = pytest.mark.integration

AUTH = "127.0.0.1:4224"    # NATS users (scripts/services start nats-tls)
TOKEN = "127.0.0.1:4225"   # NATS token
KAFKA_SASL = "127.0.0.1:9094"  # the shared broker's SASL_PLAINTEXT listener
KAFKA_SSL = "127.0.0.1:9194"   # kafka-tls
REDIS = "127.0.0.1:6379"
PG = "127.0.0.1:5432"
ENV_VAR = "NATSCONN_SWEEP_SECRET"

# Options each plugin needs besides its connection (a plant fills in the rest).
REQUIRED: dict[tuple[str, str], dict[str, Any]] = {
    ("source", "nats"): {"subjects": ["sweep.x"]},
    ("source", "jetstream"): {"stream": "SWEEP"},
    ("source", "kafka"): {"topics": ["sweep"]},
    ("source", "redis_stream"): {"streams": ["sweep"]},
    ("source", "redis_list"): {"key": "sweep"},
    ("source", "redis_pubsub"): {"channels": ["sweep"]},
    ("source", "postgres_outbox"): {"table": "sweep_outbox"},
    ("source", "postgres_notify"): {"channels": ["sweep"]},
    ("sink", "nats"): {"subject": "sweep.x"},
    ("sink", "jetstream"): {"subject": "sweep.x"},
    ("sink", "kafka"): {"topic": "sweep"},
    ("sink", "redis_stream"): {"stream": "sweep"},
    ("sink", "redis_list"): {"key": "sweep"},
    ("sink", "redis_kv"): {"key": "sweep"},
    ("sink", "redis_pubsub"): {"channel": "sweep"},
    ("sink", "postgres"): {"table": "sweep"},
    ("sink", "webhook"): {},
    ("source", "nats_kv"): {"bucket": "sweep"},
    ("sink", "nats_kv"): {"bucket": "sweep"},
    ("sink", "nats_object"): {"bucket": "sweep"},
    ("source", "postgres_cdc"): {"slot": "sweep_slot", "publication": "sweep_pub"},
    ("transform", "claim_check_put"): {"bucket": "sweep"},
    ("transform", "claim_check_get"): {},
}


@dataclass
class Plant:
    """One pipeline whose source or sink carries planted secrets."""

    name: str
    kind: str
    plugin: str
    options: dict[str, Any]
    covers: set[str]             # secret fields (dotted) this plant fills
    secrets: list[str] = field(default_factory=list)

    def pipeline(self) -> dict[str, Any]:
        plugin = {"type": self.plugin, **REQUIRED.get((self.kind, self.plugin), {}),
                  **self.options}
        if self.kind == "source":
            return {"name": self.name, "source": plugin, "sink": {"type": "drop"}}
        if self.kind == "transform":
            return {"name": self.name, "source": {"type": "generate", "rate": 5},
                    "transforms": [plugin], "sink": {"type": "drop"}}
        return {"name": self.name, "source": {"type": "generate", "rate": 5}, "sink": plugin}


class Secrets:
    """Unique secrets, and the files some of them live in."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.all: list[str] = []
        self.env: dict[str, str] = {}

    def new(self, label: str) -> str:
        # Letters and digits only: fits URLs, YAML and JSON without escaping.
        value = f"Sw33p{label}{uuid.uuid4().hex[:12]}"
        self.all.append(value)
        return value

    def file(self, label: str, content: str | None = None) -> tuple[str, str]:
        """A secret in a file; returns (secret, path)."""
        secret = self.new(label)
        path = self.tmp_path / f"secret-{label}.txt"
        path.write_text((content or "{}").replace("{}", secret) + "\n")
        return secret, str(path)


def _nats_plants(kind: str, plugin: str, s: Secrets, closed: int) -> Iterator[Plant]:
    p = f"{kind[:3]}-{plugin}"
    pw = s.new("natspw")
    yield Plant(f"{p}-password", kind, plugin,
                {"servers": [f"nats://{AUTH}"], "user": "sweep-user", "password": pw},
                {"password"}, [pw])
    tok = s.new("natstok")
    yield Plant(f"{p}-token", kind, plugin, {"servers": [f"nats://{TOKEN}"], "token": tok},
                {"token"}, [tok])
    seed = s.new("natsseed")
    yield Plant(f"{p}-seed", kind, plugin, {"servers": [f"nats://{AUTH}"], "nkey_seed": seed},
                {"nkey_seed"}, [seed])
    upw = s.new("natsurlpw")
    yield Plant(f"{p}-urlpw", kind, plugin, {"servers": [f"nats://sweep-user:{upw}@{AUTH}"]},
                set(), [upw])
    utok = s.new("natsurltok")
    yield Plant(f"{p}-urltok", kind, plugin, {"servers": [f"nats://{utok}@{TOKEN}"]},
                set(), [utok])
    fpw, path = s.file(f"natsfile{kind}{plugin}")
    yield Plant(f"{p}-file", kind, plugin, {"servers": [f"nats://{AUTH}"], "user": "sweep-user",
                                            "password": f"${{file:{path}}}"}, set(), [fpw])
    creds, cpath = s.file(f"natscreds{kind}{plugin}", "-----BEGIN NATS USER JWT-----\n"
                          "eyJ0eXAiOiJKV1QifQ.{}.sig\n------END NATS USER JWT------\n\n"
                          "-----BEGIN USER NKEY SEED-----\nSU{}\n------END USER NKEY SEED------")
    yield Plant(f"{p}-creds", kind, plugin, {"servers": [f"nats://{AUTH}"],
                                             "creds_file": cpath}, set(), [creds])
    dead = s.new("natsdead")
    yield Plant(f"{p}-dead", kind, plugin,
                {"servers": [f"nats://sweep-user:{dead}@127.0.0.1:{closed}"]}, set(), [dead])


def _kafka_plants(kind: str, s: Secrets, closed: int, certs: Any) -> Iterator[Plant]:
    p = f"{kind[:3]}-kafka"
    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
            "username": "natsconn", "connect_timeout": 5}
    pw = s.new("kafkapw")
    yield Plant(f"{p}-password", kind, "kafka",
                {"bootstrap_servers": [KAFKA_SASL], **sasl, "password": pw}, {"password"}, [pw])
    kpw, tpw = s.new("kafkakeypw"), s.new("kafkatlspw")
    yield Plant(f"{p}-keypw", kind, "kafka", {
        "bootstrap_servers": [KAFKA_SSL], **sasl, "security_protocol": "SASL_SSL",
        "password": tpw, "tls": {"ca_file": certs.ca, "cert_file": certs.client_cert,
                                 "key_file": certs.client_key, "key_password": kpw}},
        {"tls.key_password"}, [kpw, tpw])
    fpw, path = s.file(f"kafkafile{kind}")
    yield Plant(f"{p}-file", kind, "kafka", {"bootstrap_servers": [KAFKA_SASL], **sasl,
                                             "password": f"${{file:{path}}}"}, set(), [fpw])
    dead = s.new("kafkadead")
    yield Plant(f"{p}-dead", kind, "kafka", {"bootstrap_servers": [f"127.0.0.1:{closed}"],
                                             **sasl, "password": dead}, set(), [dead])


def _redis_plants(kind: str, plugin: str, s: Secrets, closed: int) -> Iterator[Plant]:
    p = f"{kind[:3]}-{plugin}"
    fast = {"connect_timeout": 1, "reconnect": {"attempts": 1}}
    pw = s.new("redispw")
    yield Plant(f"{p}-password", kind, plugin, {"url": f"redis://{REDIS}/0",
                                                "username": "sweep-nobody", "password": pw,
                                                **fast}, {"password"}, [pw])
    upw = s.new("redisurlpw")
    yield Plant(f"{p}-urlpw", kind, plugin, {"url": f"redis://sweep-nobody:{upw}@{REDIS}/0",
                                             **fast}, set(), [upw])
    epw = s.new("redisenv")
    s.env[ENV_VAR] = epw
    yield Plant(f"{p}-env", kind, plugin, {"url": f"redis://{REDIS}/0",
                                           "username": "sweep-nobody",
                                           "password": f"${{{ENV_VAR}}}", **fast}, set(), [epw])
    dead = s.new("redisdead")
    yield Plant(f"{p}-dead", kind, plugin,
                {"url": f"redis://sweep-nobody:{dead}@127.0.0.1:{closed}/0", **fast},
                set(), [dead])


def _postgres_plants(kind: str, plugin: str, s: Secrets, closed: int) -> Iterator[Plant]:
    p = f"{kind[:3]}-{plugin}"
    dsn = s.new("pgdsn")
    yield Plant(f"{p}-dsn", kind, plugin,
                {"dsn": f"postgresql://natsconn:{dsn}@{PG}/natsconn", "connect_timeout": 2},
                {"dsn"}, [dsn])
    pw = s.new("pgpw")
    yield Plant(f"{p}-password", kind, plugin,
                {"host": "127.0.0.1", "port": 5432, "user": "natsconn", "password": pw,
                 "database": "natsconn", "connect_timeout": 2}, {"password"}, [pw])
    fpw, path = s.file(f"pgfile{kind}{plugin}")
    yield Plant(f"{p}-file", kind, plugin,
                {"dsn": f"postgresql://natsconn@{PG}/natsconn",
                 "password": f"${{file:{path}}}", "connect_timeout": 2}, set(), [fpw])
    dead = s.new("pgdead")
    yield Plant(f"{p}-dead", kind, plugin,
                {"dsn": f"postgresql://natsconn:{dead}@127.0.0.1:{closed}/natsconn",
                 "connect_timeout": 2}, set(), [dead])


def _webhook_plants(s: Secrets, closed: int) -> Iterator[Plant]:
    tok = s.new("webhooktok")
    yield Plant("sin-webhook-token", "sink", "webhook",
                {"url": f"http://127.0.0.1:{closed}/hook", "bearer_token": tok, "timeout": 1},
                {"bearer_token"}, [tok])


def _registry_plants(s: Secrets, closed: int) -> Iterator[Plant]:
    """decode and encode talk to a schema registry that is not there, with a password."""
    for plugin in ("decode", "encode"):
        pw = s.new(f"registrypw{plugin}")
        yield Plant(f"tra-{plugin}-registry", "transform", plugin, {
            "format": "avro",
            "registry": {"url": f"http://127.0.0.1:{closed}/apis/ccompat/v7",
                         "username": "sweep", "password": pw, "timeout": 1}},
            {"registry.password"}, [pw])
        upw = s.new(f"registryurlpw{plugin}")
        yield Plant(f"tra-{plugin}-registry-url", "transform", plugin, {
            "format": "avro",
            "registry": {"url": f"http://sweep:{upw}@127.0.0.1:{closed}/apis/ccompat/v7",
                         "timeout": 1}}, set(), [upw])


def make_plants(tmp_path: Path, certs: Any) -> tuple[list[Plant], Secrets]:
    s = Secrets(tmp_path)
    closed = free_port()  # nothing listens there
    plants: list[Plant] = []
    for kind in ("source", "sink"):
        for plugin in ("nats", "jetstream"):
            plants += _nats_plants(kind, plugin, s, closed)
        plants += _kafka_plants(kind, s, closed, certs)
        redis = (("redis_stream", "redis_list", "redis_pubsub") if kind == "source"
                 else ("redis_stream", "redis_list", "redis_kv", "redis_pubsub"))
        for plugin in redis:
            plants += _redis_plants(kind, plugin, s, closed)
        pg = ("postgres_outbox", "postgres_notify") if kind == "source" else ("postgres",)
        for plugin in pg:
            plants += _postgres_plants(kind, plugin, s, closed)
    plants += _webhook_plants(s, closed)
    for kind, plugin in (("source", "nats_kv"), ("sink", "nats_kv"), ("sink", "nats_object"),
                         ("transform", "claim_check_put"), ("transform", "claim_check_get")):
        plants += _nats_plants(kind, plugin, s, closed)
    plants += _postgres_plants("source", "postgres_cdc", s, closed)
    plants += _registry_plants(s, closed)
    return plants, s


def secret_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted names of every SecretStr field of a config model, nested ones too."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        for arg in typing.get_args(info.annotation) or (info.annotation,):
            if arg is SecretStr:
                out.add(prefix + name)
            elif isinstance(arg, type) and issubclass(arg, BaseModel):
                out |= secret_fields(arg, f"{prefix}{name}.")
    return out


def assert_clean(text: str, secrets: list[str], where: str) -> None:
    leaked = [s for s in secrets if s in text]
    if leaked:
        lines = [line for line in text.splitlines() if any(s in line for s in leaked)]
        raise AssertionError(f"{len(leaked)} secret(s) in {where}, e.g.:\n"
                             + "\n".join(line[:400] for line in lines[:5]))


# ---------------------------------------------------------------------- tests


def test_every_secret_option_is_planted(tmp_path: Path, certs: Any) -> None:
    """The sweep covers every SecretStr option of every installed plugin."""
    plants, _ = make_plants(tmp_path, certs)
    covered: dict[tuple[str, str], set[str]] = {}
    for plant in plants:
        covered.setdefault((plant.kind, plant.plugin), set()).update(plant.covers)
    registry = Registry()
    missing = []
    kinds: tuple[Kind, ...] = ("source", "sink", "transform")
    for kind in kinds:
        for info in registry.infos(kind):
            fields = secret_fields(registry.load(kind, info.name).Config)
            unplanted = fields - covered.get((kind, info.name), set())
            if unplanted:
                missing.append(f"{kind} {info.name}: {sorted(unplanted)}")
    assert not missing, "secret options not planted by the sweep: " + "; ".join(missing)


def _run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import subprocess

    done = subprocess.run([NATSCONN, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    return done.returncode, done.stdout + done.stderr


def _broken_variants(plant: Plant, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(file name, YAML text) of files that fail validation near the secrets."""
    good = plant.pipeline()
    base = {"pipelines": [good]}

    def plugin_of(doc: dict[str, Any]) -> dict[str, Any]:
        pipeline: dict[str, Any] = doc["pipelines"][0]
        if plant.kind == "transform":
            return pipeline["transforms"][0]  # type: ignore[no-any-return]
        return pipeline["source" if plant.kind == "source" else "sink"]  # type: ignore[no-any-return]

    # 1. a secret-bearing value of the wrong type (the error shows what it found)
    for key, value in plant.options.items():
        if isinstance(value, str | list | dict) and any(s in str(value) for s in plant.secrets):
            bad = yaml.safe_load(yaml.safe_dump(base))
            plugin_of(bad)[key] = {"oops": value} if not isinstance(value, dict) else [value]
            yield f"{plant.name}-type-{key}.yaml", yaml.safe_dump(bad)
    # 2. an unknown option beside the secrets
    bad = yaml.safe_load(yaml.safe_dump(base))
    plugin_of(bad)["no_such_option"] = 1
    yield f"{plant.name}-extra.yaml", yaml.safe_dump(bad)
    # 3. a YAML syntax error on a line holding a secret
    text = yaml.safe_dump(base)
    for line in text.splitlines():
        if any(s in line for s in plant.secrets):
            # an opening quote that is never closed: the scanner reads to the end
            opened = (line.replace("- ", '- "', 1) if line.lstrip().startswith("- ")
                      else line.replace(": ", ': "', 1))
            yield f"{plant.name}-syntax.yaml", text.replace(line, opened, 1)
            break
    # 4. the whole mapping where a list is expected
    bad = yaml.safe_load(yaml.safe_dump(base))
    bad["pipelines"] = bad["pipelines"][0]
    yield f"{plant.name}-shape.yaml", yaml.safe_dump(bad)


def test_validate_never_shows_a_secret(tmp_path: Path, certs: Any) -> None:
    plants, s = make_plants(tmp_path, certs)
    valid = pipeline_file(tmp_path, [p.pipeline() for p in plants], name="valid.yaml")
    code, out = _run_cli("validate", str(valid), env=s.env)
    assert code == 0, out
    assert f"valid ({len(plants)} pipeline(s)" in out, out
    assert_clean(out, s.all, "natsconn validate of a valid file")
    broken: list[str] = []
    for plant in plants:
        for name, text in _broken_variants(plant, tmp_path):
            path = tmp_path / name
            path.write_text(text)
            broken.append(str(path))
    code, out = _run_cli("validate", *broken, env=s.env)
    assert code == 2, out
    assert out.count("error: ") == len(broken), out
    assert_clean(out, s.all, "natsconn validate of broken files")


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_run_logs_metrics_and_readyz_never_show_a_secret(
        tmp_path: Path, certs: Any, log_format: str, nats_auth_url: str,
        nats_token_url: str, kafka_ssl_bootstrap: str, kafka_bootstrap: str,
        redis_url: str, postgres_dsn: str) -> None:
    """natsconn run --log-level debug against refusing and dead servers."""
    plants, s = make_plants(tmp_path, certs)
    file = pipeline_file(tmp_path, [p.pipeline() for p in plants],
                         restart_backoff="1s", restart_backoff_max="3s", shutdown_timeout="3s",
                         log={"level": "debug", "format": log_format})
    async with natsconn_process(file, ready=False, log_format=log_format,
                                env=s.env) as proc:
        # Every pipeline has failed at least once (its name is in a log line).
        missing: list[str] = []

        async def all_failed() -> bool:
            text = proc.log()
            missing[:] = [p.name for p in plants if p.name not in text]
            return not missing

        try:
            await wait_until(all_failed, 90, "every pipeline failed once")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; never logged: {missing}") from None
        await asyncio.sleep(4)  # a restart or two more
        status, readyz = await proc.http_get("/readyz")
        assert status == 503
        _, metrics = await proc.http_get("/metrics")
        proc.signal(signal.SIGTERM)
        await proc.wait_exit(30)
        log = proc.log()
    assert b"natsconn_" in metrics
    assert_clean(log, s.all, f"the {log_format} log")
    assert_clean(metrics.decode(), s.all, "/metrics")
    assert_clean(readyz.decode(), s.all, "/readyz")
    if log_format == "json":
        assert len(log_records(log)) > len(plants), "expected JSON log lines"


class _Capture(logging.Handler):
    """Every record as the code made it: message, arguments and exception text,
    before any formatter redacts anything."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.troubled: set[str] = set()  # pipelines with a warning or an error

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.troubled.add(str(getattr(record, "pipeline", "")))
            if record.name.startswith("natsconn.pipeline."):  # natsconn.pipeline.NAME[.role]
                self.troubled.add(record.name.split(".")[2])
        parts = [str(record.msg), record.getMessage(), repr(record.args)]
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            parts.append("".join(traceback.format_exception(exc)))
            cause: BaseException | None = exc
            while cause is not None:  # chained causes, even when suppressed
                parts.append(repr(cause))
                cause = cause.__cause__ or cause.__context__
        parts += [f"{k}={v!r}" for k, v in vars(record).items() if k not in (
            "msg", "args", "exc_info", "exc_text")]
        self.texts.append("\n".join(parts))


async def test_exceptions_raised_in_process_never_hold_a_secret(
        tmp_path: Path, certs: Any, nats_auth_url: str, nats_token_url: str,
        kafka_ssl_bootstrap: str, kafka_bootstrap: str, redis_url: str,
        postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor in this process; every log record and every exception text
    (with chained causes) it produces, checked before redaction."""
    plants, s = make_plants(tmp_path, certs)
    for key, value in s.env.items():
        monkeypatch.setenv(key, value)
    file = pipeline_file(tmp_path, [p.pipeline() for p in plants],
                         restart_backoff="1s", restart_backoff_max="3s")
    capture = _Capture()
    root = logging.getLogger()
    saved = root.level, [logging.getLogger(n).level for n in ("natsconn", "natsconn_plugins")]
    root.addHandler(capture)
    root.setLevel(logging.WARNING)  # as natsconn run --log-level debug configures it
    logging.getLogger("natsconn").setLevel(logging.DEBUG)
    logging.getLogger("natsconn_plugins").setLevel(logging.DEBUG)
    loaded = load_file(file)
    supervisor = Supervisor(loaded, "sweep")
    task = asyncio.create_task(supervisor.run())
    try:
        def never() -> list[str]:
            # connect failures restart the pipeline; write failures (webhook) are retried
            return [n for n, r in supervisor.records.items()
                    if not r.last_error and n not in capture.troubled]

        try:
            await wait_until(lambda: not never(), 90, "every pipeline failed once")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; never failed: {never()}") from None
        await asyncio.sleep(4)
    finally:
        supervisor.stop(3)
        await asyncio.wait_for(task, 30)
        root.removeHandler(capture)
        root.setLevel(saved[0])
        for name, level in zip(("natsconn", "natsconn_plugins"), saved[1], strict=True):
            logging.getLogger(name).setLevel(level)
    errors = [r.last_error or "" for r in supervisor.records.values()]
    assert_clean("\n".join(errors), s.all, "the pipelines' last errors")
    assert_clean("\n".join(capture.texts), s.all, "log records and exception texts")
