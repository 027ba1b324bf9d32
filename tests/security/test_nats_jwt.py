"""NATS decentralised auth: ``creds_file`` (user JWT and NKey seed) against a
nats-server in operator mode with a memory resolver, all made by the test
(tests/security/nats_jwt.py: operator, account and user JWTs encoded and signed
with ``nkeys``; no ``nsc``).

* A valid user: core NATS and JetStream, each as source and as sink, through
  one ``natsconn run``: every message arrives once.
* An expired user (``exp`` an hour ago) and a revoked user (listed in the
  account JWT's revocations), each as a source and as a sink: each pipeline
  logs one error per attempt naming it and the cause (expired, with when; or
  revoked), ``/readyz`` stays 503, no seed appears, and no message of the
  source stream is acknowledged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from integration.helpers import (
    Collector,
    assert_exactly,
    natsconn_process,
    payload,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    wait_stream_count,
)
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from natsconn_nats.connection import creds_hint
from natsconn_nats.jetstream_sink import JetStreamSink
from natsconn_nats.source import NatsSource

from .nats_jwt import Operator, operator_mode_server
from .support import assert_pipelines_refused, connect_error

pytestmark = pytest.mark.integration

N = 500


@dataclass
class JwtServer:
    url: str
    good: Path   # creds files
    expired: Path
    revoked: Path
    seeds: list[str]  # every user's seed: must never be printed


@pytest.fixture
async def jwt_server(tmp_path: Path) -> AsyncIterator[JwtServer]:
    op = Operator(tmp_path / "nats-jwt")
    op.directory.mkdir(parents=True)
    now = int(time.time())
    good_key, good = op.user("bridge")
    expired_key, expired = op.user("expired", issued_at=now - 7200, expires=now - 3600)
    revoked_key, revoked = op.user("revoked", issued_at=now - 60)
    op.revoke(revoked_key, at=now)
    seeds = [k.seed for k in (good_key, expired_key, revoked_key)]
    async with operator_mode_server(op) as url:
        yield JwtServer(url, good, expired, revoked, seeds)


@pytest.fixture
async def jnc(jwt_server: JwtServer) -> AsyncIterator[NATS]:
    """The test's own connection, as the valid user."""
    client = await nats.connect(jwt_server.url, user_credentials=str(jwt_server.good),
                                connect_timeout=5, max_reconnect_attempts=3)
    yield client
    await client.close()


def _opts(server: JwtServer, creds: Path) -> dict[str, object]:
    return {"servers": [server.url], "creds_file": str(creds)}


async def test_creds_file_core_and_jetstream(jwt_server: JwtServer, jnc: NATS,
                                             tmp_path: Path) -> None:
    """Core NATS → JetStream and JetStream → core NATS, every plugin on the user's
    creds file: N messages each way, each once."""
    js = jnc.jetstream()
    await js.add_stream(name="JWT_SRC", subjects=["jsrc.>"])
    await publish_js(jnc, lambda i: f"jsrc.{i % 5}", N)
    out = await Collector.subscribe(jnc, "jout.>")
    file = pipeline_file(tmp_path, [
        {"name": "core-to-js",
         "source": {"type": "nats", **_opts(jwt_server, jwt_server.good),
                    "subjects": ["jin.>"]},
         "sink": {"type": "jetstream", **_opts(jwt_server, jwt_server.good),
                  "subject": "jdst.{subject[-1]}", "stream": "JWT_DST",
                  "stream_subjects": ["jdst.>"]}},
        {"name": "js-to-core",
         "source": {"type": "jetstream", **_opts(jwt_server, jwt_server.good),
                    "stream": "JWT_SRC", "durable": "bridge"},
         "sink": {"type": "nats", **_opts(jwt_server, jwt_server.good),
                  "subject": "jout.{subject[-1]}"}},
    ])
    async with natsconn_process(file) as proc:
        status, state = await proc.readyz()
        assert status == 200, state
        # The core source is subscribed once ready: publish to it now.
        for i in range(N):
            await jnc.publish(f"jin.{i % 5}", payload(i))
        await jnc.flush()
        await wait_stream_count(jnc, "JWT_DST", N, timeout=30)
        await out.wait_for(N, 30)
        log = proc.log()
    got = await read_stream(jnc, "JWT_DST", timeout=30)
    assert_exactly([seq_of(m.data) for m in got], N, "core NATS → JetStream (JWT_DST)")
    assert_exactly(out.seqs(), N, "JetStream → core NATS (jout.>)")
    info = await js.consumer_info("JWT_SRC", "bridge")
    assert info.ack_floor is not None and info.ack_floor.stream_seq == N, info
    for seed in jwt_server.seeds:
        assert seed not in log


async def test_expired_and_revoked_users_refused(jwt_server: JwtServer, jnc: NATS,
                                                 tmp_path: Path) -> None:
    """Each refused user is one clear error per attempt, /readyz 503, nothing acked."""
    js = jnc.jetstream()
    await js.add_stream(name="JWT_REF", subjects=["jref.>"])
    await publish_js(jnc, "jref.x", 50)
    ok = _opts(jwt_server, jwt_server.good)
    expired = _opts(jwt_server, jwt_server.expired)
    revoked = _opts(jwt_server, jwt_server.revoked)
    pipelines = [
        {"name": "expired-source",
         "source": {"type": "jetstream", **expired, "stream": "JWT_REF", "durable": "exp-src"},
         "sink": {"type": "nats", **ok, "subject": "jref-out.a"}},
        {"name": "expired-sink",
         "source": {"type": "jetstream", **ok, "stream": "JWT_REF", "durable": "exp-sink"},
         "sink": {"type": "nats", **expired, "subject": "jref-out.b"}},
        {"name": "revoked-source",
         "source": {"type": "nats", **revoked, "subjects": ["jref-in.>"]},
         "sink": {"type": "jetstream", **ok, "subject": "jref.y"}},
        {"name": "revoked-sink",
         "source": {"type": "jetstream", **ok, "stream": "JWT_REF", "durable": "rev-sink"},
         "sink": {"type": "jetstream", **revoked, "subject": "jref-out.c"}},
    ]
    expired_words = ("Authorization Violation", "expired at", str(jwt_server.expired))
    revoked_words = ("Authorization Violation", "revoked", str(jwt_server.revoked))
    log = await assert_pipelines_refused(
        tmp_path, pipelines,
        {"expired-source": expired_words, "expired-sink": expired_words,
         "revoked-source": revoked_words, "revoked-sink": revoked_words},
        secrets=jwt_server.seeds)
    # Nothing acknowledged: the stream holds its 50, no consumer acked any of them.
    info = await js.stream_info("JWT_REF")
    assert info.state.messages == 50, info.state
    for durable in ("exp-src", "exp-sink", "rev-sink"):
        try:
            consumer = await js.consumer_info("JWT_REF", durable)
        except NotFoundError:
            continue  # never created: nothing read, nothing acked
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        assert not floor, f"{durable}: ack floor {floor} with its sink refused\n{log}"
    assert "expired-sink" in log and "revoked-sink" in log


async def test_creds_hint_for_a_refused_plugin(jwt_server: JwtServer) -> None:
    """Plugin by plugin: connect() fails with one ConnectorError naming the cause."""
    for creds, words in ((jwt_server.expired, ("expired at", "issue new credentials")),
                         (jwt_server.revoked, ("revoked",))):
        for plugin in (NatsSource.make_test_instance(**_opts(jwt_server, creds),
                                                     subjects=["x"], connect_timeout=2),
                       JetStreamSink.make_test_instance(**_opts(jwt_server, creds),
                                                        subject="x", connect_timeout=2)):
            text = await connect_error(plugin, "Authorization Violation", *words, timeout=30)
            assert jwt_server.url.rpartition("/")[2] in text, text
            assert not any(seed in text for seed in jwt_server.seeds), text
    # The hint for a valid user's file (in date) prints no seed either.
    assert "in date" in creds_hint(str(jwt_server.good))
    assert not any(s in creds_hint(str(jwt_server.good)) for s in jwt_server.seeds)
