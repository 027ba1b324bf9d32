"""Issue 3: SASL SCRAM against the broker's SASL_PLAINTEXT listener, both
directions; a wrong password or a dead broker address gives one clear error
naming the pipeline and the cause, and ``/readyz`` says not ready."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from ..helpers import (
    assert_exactly,
    create_stream,
    free_port,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    run_in_process,
    seq_of,
    wait_ready_in_process,
    wait_stream_count,
    wait_until,
)
from .kafka_helpers import SASL_PASSWORD, SASL_USER, create_topic

pytestmark = pytest.mark.integration

N = 2_000


def sasl(bootstrap: str, mechanism: str, password: str = SASL_PASSWORD) -> dict[str, Any]:
    return {"bootstrap_servers": [bootstrap], "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": mechanism, "username": SASL_USER, "password": password}


@pytest.fixture
def kafka_sasl_bootstrap(kafka_bootstrap: str) -> str:
    """The SASL_PLAINTEXT listener scripts/services starts beside the plain one."""
    import os

    return os.environ.get("KAFKA_SASL_BOOTSTRAP", "127.0.0.1:9094")


async def test_sasl_scram_both_directions(
        nc: NATS, nats_url: str, kafka_bootstrap: str, kafka_sasl_bootstrap: str,
        unique: str, tmp_path: Path) -> None:
    topic = f"sasl-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    await create_stream(nc, f"SASL_IN_{unique}", [f"saslin.{unique}.>"])
    await publish_js(nc, f"saslin.{unique}.x", N)
    file = pipeline_file(tmp_path, [
        {"name": f"sasl-out-{unique}",
         "source": {"type": "jetstream", "servers": [nats_url], "stream": f"SASL_IN_{unique}"},
         "sink": {"type": "kafka", "topic": topic,
                  **sasl(kafka_sasl_bootstrap, "SCRAM-SHA-512")}},
        {"name": f"sasl-in-{unique}",
         "source": {"type": "kafka", "topics": [topic],
                    **sasl(kafka_sasl_bootstrap, "SCRAM-SHA-256")},
         "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"saslout.{unique}.x",
                  "stream": f"SASL_OUT_{unique}", "stream_subjects": [f"saslout.{unique}.>"]}},
    ])
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await wait_stream_count(nc, f"SASL_OUT_{unique}", N, timeout=60)
    got = await read_stream(nc, f"SASL_OUT_{unique}")
    assert_exactly([seq_of(m.data) for m in got], N, "through SASL SCRAM both ways")


async def _not_ready_with(file: Path, pipeline: str, cause: str) -> str:
    """natsconn runs, /readyz stays 503 naming the pipeline, and the log has the
    clear error: the pipeline, the cause; and no aiokafka noise about it."""
    async with natsconn_process(file, ready=False) as proc:
        lines: list[str] = []

        def logged() -> bool:
            nonlocal lines
            lines = [ln for ln in proc.log().splitlines() if cause in ln]
            return bool(lines)

        await wait_until(logged, 30, f"an error line with {cause!r}")
        status, body = await proc.readyz()
        assert status == 503, f"/readyz {status} {body} while the sink cannot connect"
        assert body.get("pipelines", body).get(pipeline) != "running", body
        log = proc.log()
    first = json.loads(lines[0])
    assert first["level"].lower() == "error", first
    text = json.dumps(first)
    assert pipeline in text, f"the error does not name the pipeline: {text}"
    assert "Unable connect to" not in log, "aiokafka's own duplicate error lines leaked"
    return str(first["msg"])


async def test_wrong_sasl_password_is_one_clear_error(
        nats_url: str, kafka_sasl_bootstrap: str, unique: str, tmp_path: Path) -> None:
    pipeline = f"badpw-{unique}"
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "nats", "servers": [nats_url], "subjects": [f"badpw.{unique}"]},
        "sink": {"type": "kafka", "topic": f"badpw-{unique}",
                 **sasl(kafka_sasl_bootstrap, "SCRAM-SHA-256", "not-the-password")},
    }])
    message = await _not_ready_with(file, pipeline, "Authentication failed")
    assert "invalid credentials" in message and kafka_sasl_bootstrap in message, message
    print(message)


async def test_bad_broker_address_is_one_clear_error(
        nats_url: str, kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    pipeline = f"badaddr-{unique}"
    dead = f"127.0.0.1:{free_port()}"
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "kafka", "bootstrap_servers": [dead], "topics": [f"x-{unique}"]},
        "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"badaddr.{unique}"},
    }])
    message = await _not_ready_with(file, pipeline, "could not connect")
    # "Connection refused" (uvloop) or "[Errno 111] Connect call failed" (asyncio)
    assert dead in message and ("refused" in message.lower()
                                or "errno 111" in message.lower()), message
    print(message)
