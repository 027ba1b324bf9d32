"""Shared pieces of the security tests.

The servers are the TLS and authentication variants that ``scripts/services
start tls`` runs beside the plain ones (see scripts/lib/services-tls.sh for
ports, certificates and the test credentials repeated here). A server that is
not running fails the test with the command that starts it; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration.helpers import natsconn_process, pipeline_file, wait_until

from connector import ConnectorError, Sink, Source

# Test credentials of scripts/lib/services-tls.sh (throwaway, loopback only).
NATS_USER, NATS_PASSWORD = "natsconn-user", "natsconn-user-pw"
NATS_TOKEN = "natsconn-token-s3cret"
KAFKA_USER, KAFKA_PASSWORD = "natsconn-tls", "natsconn-tls-pw"
REDIS_USER, REDIS_PASSWORD = "natsconn-tls", "natsconn-tls-pw"
REDIS_LIMITED_USER, REDIS_LIMITED_PASSWORD = "natsconn-limited", "natsconn-limited-pw"
PG_USER, PG_PASSWORD, PG_DB = "natsconn_tls", "natsconn-tls-pw", "natsconn"


@dataclass(frozen=True)
class Certs:
    """The throwaway PKI in the state directory (paths as strings, for options)."""

    dir: Path

    def _file(self, name: str) -> str:
        return str(self.dir / name)

    @property
    def ca(self) -> str:
        return self._file("ca.pem")

    @property
    def client_cert(self) -> str:
        return self._file("client.pem")

    @property
    def client_key(self) -> str:
        return self._file("client.key")

    @property
    def rogue_ca(self) -> str:
        """A CA nobody trusts (and that signed nothing the servers use)."""
        return self._file("rogue-ca.pem")

    @property
    def rogue_client_cert(self) -> str:
        return self._file("rogue-client.pem")

    @property
    def rogue_client_key(self) -> str:
        return self._file("rogue-client.key")

    @property
    def nkey_seed(self) -> str:
        return (self.dir / "nkey.seed").read_text().strip()

    def mtls(self, **override: str) -> dict[str, str]:
        """ca_file, cert_file, key_file of the trusted client."""
        return {"ca_file": self.ca, "cert_file": self.client_cert,
                "key_file": self.client_key, **override}


def tls_dir() -> Path:
    default = Path.home() / ".cache" / "natsconn" / "state" / "tls"
    return Path(os.environ.get("NATSCONN_TLS_DIR") or default)


@dataclass(frozen=True)
class TlsService:
    name: str      # as scripts/services knows it
    env: str
    default: str
    port: int


SERVICES = {
    "nats_tls": TlsService("nats-tls", "NATS_TLS_URL", "tls://127.0.0.1:4223", 4223),
    "nats_auth": TlsService("nats-tls", "NATS_AUTH_URL", "nats://127.0.0.1:4224", 4224),
    "nats_token": TlsService("nats-tls", "NATS_TOKEN_URL", "nats://127.0.0.1:4225", 4225),
    "kafka_ssl": TlsService("kafka-tls", "KAFKA_SSL_BOOTSTRAP", "127.0.0.1:9194", 9194),
    "redis_tls": TlsService("redis-tls", "REDIS_TLS_URL", "rediss://127.0.0.1:6380/0", 6380),
    "postgres_tls": TlsService("postgres-tls", "POSTGRES_TLS_DSN",
                               f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:5433/{PG_DB}",
                               5433),
}


def require(key: str) -> str:
    """The service's address, after checking that it accepts connections."""
    service = SERVICES[key]
    value = os.environ.get(service.env) or service.default
    if not (tls_dir() / "ca.pem").is_file():
        pytest.fail(f"no test CA in {tls_dir()}. Start the TLS servers with "
                    f"`scripts/services start tls`.", pytrace=False)
    try:
        with socket.create_connection(("127.0.0.1", service.port), timeout=2):
            pass
    except OSError as exc:
        pytest.fail(f"{service.name} is not reachable on 127.0.0.1:{service.port} "
                    f"({exc.strerror or exc}). Start it with `scripts/services start "
                    f"{service.name}`.", pytrace=False)
    return value


async def connect_error(plugin: Source[Any] | Sink[Any], *needles: str,
                        timeout: float = 60.0) -> str:
    """``plugin.connect()`` must fail with one ConnectorError whose text holds every
    needle (see :func:`has`); the plugin is closed either way. Returns the text."""
    try:
        async with asyncio.timeout(timeout):
            await plugin.connect()
    except ConnectorError as exc:
        text = str(exc)
    except TimeoutError:
        raise AssertionError(f"connect() of {type(plugin).__name__} neither connected nor "
                             f"failed within {timeout}s") from None
    else:
        raise AssertionError(f"{type(plugin).__name__} connected; expected an error with "
                             f"{needles}")
    finally:
        await asyncio.wait_for(plugin.close(), 20)
    for needle in needles:
        assert has(text, needle), f"{needle!r} not in the error: {text}"
    return text


def has(text: str, words: str) -> bool:
    """``words`` (case-insensitive) is in ``text``; ``a|b`` means either."""
    return any(w.lower() in text.lower() for w in words.split("|"))


async def connects(plugin: Source[Any] | Sink[Any], timeout: float = 30.0) -> None:
    """``plugin.connect()`` succeeds (and the plugin is closed again)."""
    try:
        await asyncio.wait_for(plugin.connect(), timeout)
    finally:
        await asyncio.wait_for(plugin.close(), 20)


def log_records(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a natsconn process (other lines are ignored)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


async def assert_pipelines_refused(
    tmp_path: Path,
    pipelines: list[dict[str, Any]],
    causes: Mapping[str, Iterable[str]],
    secrets: Iterable[str] = (),
) -> str:
    """Run ``natsconn run`` with pipelines that cannot connect: each pipeline's
    connect error is logged naming the pipeline and holding its expected cause
    words, /readyz stays 503 with none of them running, no traceback is logged
    and no secret appears anywhere in the output. Returns the log."""
    file = pipeline_file(tmp_path, pipelines, shutdown_timeout="2s", restart_backoff="2s",
                         restart_backoff_max="5s")
    async with natsconn_process(file, ready=False, log_format="json") as proc:

        def logged(name: str) -> bool:
            return any(r.get("pipeline") == name and r.get("level") == "error"
                       and "could not connect" in r.get("msg", "")
                       for r in log_records(proc.log()))

        for name in causes:
            await wait_until(lambda name=name: logged(name), 90,
                             f"a connect error logged for pipeline {name}")
        for _ in range(3):
            status, state = await proc.readyz()
            assert status == 503, (status, state)
            for name in causes:
                assert state["pipelines"][name] != "running", state
            await asyncio.sleep(0.5)
        _, metrics = await proc.http_get("/metrics")
        log = proc.log()
    assert "Traceback" not in log, log
    records = log_records(log)
    for name, words in causes.items():
        errors = [r["msg"] for r in records if r.get("pipeline") == name
                  and r.get("level") == "error"]
        assert errors, f"no error logged for {name}:\n{log}"
        first = errors[0]
        assert f"pipeline {name!r}" in first, first
        for word in words:
            assert has(first, word), f"{word!r} not in the error of {name}: {first}"
        # One error per connect attempt: every later one follows a restart notice.
        restarts = [r for r in records if r.get("pipeline") == name
                    and "restarts in" in r.get("msg", "")]
        assert len(errors) <= len(restarts) + 1, (name, errors, len(restarts))
    everything = log + metrics.decode(errors="replace")
    for secret in secrets:
        assert secret not in everything, f"secret {secret!r} appears in the output:\n{log}"
    return log
