"""Redis: ACL users and TLS with client certificates, on the second redis-server of
``scripts/services start redis-tls`` (TLS only, the default user off). Bad
credentials and certificates are one clear error; /readyz stays 503; a TLS
client never talks plain text to a plain port; ACL key patterns hold."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from integration.helpers import (
    assert_exactly,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    wait_stream_count,
)
from nats.aio.client import Client as NATS
from natsconn_redis.kv_sink import RedisKvSink
from natsconn_redis.stream_sink import RedisStreamSink
from natsconn_redis.stream_source import RedisStreamSource

from connector import Message, PartialWriteError, RejectedError

from .support import (
    REDIS_LIMITED_PASSWORD,
    REDIS_LIMITED_USER,
    REDIS_PASSWORD,
    REDIS_USER,
    Certs,
    assert_pipelines_refused,
    connect_error,
    connects,
)

pytestmark = pytest.mark.integration

N = 500
FAST = {"connect_timeout": 2, "reconnect": {"attempts": 0}}


def _secure(url: str, certs: Certs, **override: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"url": url, "username": REDIS_USER, "password": REDIS_PASSWORD,
                               "tls": certs.mtls(), **FAST}
    options.update(override)
    return {k: v for k, v in options.items() if v is not None}


def _bad_cases(url: str, certs: Certs) -> dict[str, tuple[dict[str, Any], list[str]]]:
    host_port = url.removeprefix("rediss://")
    return {
        "wrong password": (_secure(url, certs, password="wrong-redis-pw-1"),
                           ["authentication failed", REDIS_USER]),
        "wrong password in the URL": (
            _secure(f"rediss://{REDIS_USER}:wrong-redis-pw-2@{host_port}", certs,
                    username=None, password=None), ["authentication failed"]),
        "no credentials (default user off)": (
            _secure(url, certs, username=None, password=None),
            ["authentication failed", "'default'"]),
        "untrusted server certificate": (
            _secure(url, certs, tls=certs.mtls(ca_file=certs.rogue_ca)),
            ["certificate verify failed"]),
        "client certificate of an unknown CA": (
            _secure(url, certs, tls=certs.mtls(cert_file=certs.rogue_client_cert,
                                                key_file=certs.rogue_client_key)),
            ["unknown ca|client certificate"]),
        "no client certificate": (_secure(url, certs, tls={"ca_file": certs.ca}),
                                  ["certificate required|client certificate"]),
        "host name not in the certificate": (
            _secure(url.replace("127.0.0.1", "localhost"), certs), ["Hostname mismatch"]),
        "TLS against the plain port": (
            _secure("rediss://127.0.0.1:6379/0", certs, username=None, password=None),
            ["is this a TLS port"]),
        "tls block with a redis:// URL against the plain port": (
            _secure("redis://127.0.0.1:6379/0", certs, username=None, password=None),
            ["is this a TLS port"]),
        "plain against the TLS port": (
            _secure(url.replace("rediss://", "redis://"), certs, tls=None),
            ["if this port wants TLS"]),
    }


SECRETS = ["wrong-redis-pw-1", "wrong-redis-pw-2", REDIS_PASSWORD]


async def test_bad_credentials_and_certificates_are_one_clear_error(
        certs: Certs, redis_tls_url: str, unique: str) -> None:
    for name, (options, words) in _bad_cases(redis_tls_url, certs).items():
        for plugin in (
            RedisStreamSink.make_test_instance(stream=f"sec:{unique}", **options),
            RedisStreamSource.make_test_instance(streams=[f"sec:{unique}"], **options),
        ):
            text = await connect_error(plugin, *words, timeout=30)
            assert "redis at" in text, (name, text)
            for secret in SECRETS:
                assert secret not in text, (name, text)


async def test_good_credentials_connect(certs: Certs, redis_tls_url: str,
                                        unique: str) -> None:
    host_port = redis_tls_url.removeprefix("rediss://")
    for options in (
        _secure(redis_tls_url, certs),
        _secure(f"rediss://{REDIS_USER}:{REDIS_PASSWORD}@{host_port}", certs,
                username=None, password=None),
        {"host": "127.0.0.1", "port": int(host_port.split(":")[1].split("/")[0]),
         "username": REDIS_USER, "password": REDIS_PASSWORD, "tls": certs.mtls(), **FAST},
        # a tls block turns a redis:// URL into TLS: never plain text
        _secure(redis_tls_url.replace("rediss://", "redis://"), certs),
    ):
        await connects(RedisStreamSink.make_test_instance(stream=f"sec:{unique}", **options))


async def test_acl_key_patterns_hold(certs: Certs, redis_tls_url: str, unique: str) -> None:
    """The limited user may write allowed:* keys only: another key is a
    RejectedError saying so (the engine dead-letters it), not a retry loop."""
    sink = RedisKvSink.make_test_instance(
        key="{subject}", **_secure(redis_tls_url, certs, username=REDIS_LIMITED_USER,
                                   password=REDIS_LIMITED_PASSWORD))
    await sink.connect()
    try:
        allowed = Message(b"ok", f"allowed:{unique}", None, {}, time.time(), "a")
        await sink.write_batch([allowed])
        denied = Message(b"no", f"denied:{unique}", None, {}, time.time(), "d")
        with pytest.raises((RejectedError, PartialWriteError)) as caught:
            await sink.write_batch([denied])
        error = caught.value
        if isinstance(error, PartialWriteError):
            assert set(error.failed) == {0}, error.failed
            error = error.failed[0]
        assert isinstance(error, RejectedError) and "no permissions" in str(error), repr(error)
    finally:
        await sink.close()
    client = aioredis.Redis.from_url(redis_tls_url, username=REDIS_USER,
                                     password=REDIS_PASSWORD, ssl_ca_certs=certs.ca,
                                     ssl_certfile=certs.client_cert,
                                     ssl_keyfile=certs.client_key)
    try:
        assert await client.get(f"allowed:{unique}") == b"ok"
        assert await client.exists(f"denied:{unique}") == 0
        await client.delete(f"allowed:{unique}")
    finally:
        await client.aclose()


async def test_round_trip_over_tls_with_acl(
        nc: NATS, nats_url: str, certs: Certs, redis_tls_url: str, unique: str,
        tmp_path: Path) -> None:
    """JetStream -> Redis stream (TLS, ACL user) -> JetStream through natsconn run."""
    password_file = tmp_path / "redis-password"
    password_file.write_text(REDIS_PASSWORD)
    secure = _secure(redis_tls_url, certs, password=f"${{file:{password_file}}}")
    stream = f"sec:{unique}"
    await create_stream(nc, f"SECR_IN_{unique}", [f"secrin.{unique}"])
    await create_stream(nc, f"SECR_OUT_{unique}", [f"secrout.{unique}"])
    await publish_js(nc, f"secrin.{unique}", N)
    file = pipeline_file(tmp_path, [
        {"name": f"to-redis-{unique}",
         "source": {"type": "jetstream", "servers": [nats_url], "stream": f"SECR_IN_{unique}"},
         "sink": {"type": "redis_stream", "stream": stream, **secure}},
        {"name": f"from-redis-{unique}",
         "source": {"type": "redis_stream", "streams": [stream], **secure},
         "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"secrout.{unique}"}},
    ], log={"level": "debug"}, shutdown_timeout="5s")
    try:
        async with natsconn_process(file) as proc:
            await wait_stream_count(nc, f"SECR_OUT_{unique}", N, 60)
            log = proc.log()
        seqs = [seq_of(m.data) for m in await read_stream(nc, f"SECR_OUT_{unique}")]
        assert_exactly(seqs, N, "JetStream -> Redis TLS -> JetStream")
        assert REDIS_PASSWORD not in log
    finally:
        for name in (f"SECR_IN_{unique}", f"SECR_OUT_{unique}"):
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(name)
        client = aioredis.Redis.from_url(redis_tls_url, username=REDIS_USER,
                                         password=REDIS_PASSWORD, ssl_ca_certs=certs.ca,
                                         ssl_certfile=certs.client_cert,
                                         ssl_keyfile=certs.client_key)
        await client.delete(stream)
        await client.aclose()


async def test_natsconn_run_names_the_pipeline_and_stays_not_ready(
        certs: Certs, redis_tls_url: str, unique: str, tmp_path: Path) -> None:
    pipelines: list[dict[str, Any]] = []
    causes: dict[str, list[str]] = {}
    for i, (options, words) in enumerate(_bad_cases(redis_tls_url, certs).values()):
        name = f"bad{i:02d}-{unique}"
        pipelines.append({"name": name, "source": {"type": "generate", "rate": 1},
                          "sink": {"type": "redis_stream", "stream": f"sec:{unique}",
                                   **options}})
        causes[name] = [*words, "could not connect"]
    await assert_pipelines_refused(tmp_path, pipelines, causes, secrets=SECRETS)
