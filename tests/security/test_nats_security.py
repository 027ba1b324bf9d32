"""NATS: TLS with server verification and client certificates, user/password,
token and NKey authentication, against the servers of ``scripts/services start
nats-tls``. A wrong credential or an untrusted certificate is one clear error,
/readyz stays 503, and TLS configured never means plain text.

The creds-file (user JWT) case is in test_nats_jwt.py, against an operator-mode
server of its own with JWTs made by the test (no ``nsc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from integration.helpers import (
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    wait_stream_count,
    wait_until,
)
from nats.aio.client import Client as NATS
from natsconn_nats.jetstream_sink import JetStreamSink
from natsconn_nats.jetstream_source import JetStreamSource
from natsconn_nats.sink import NatsSink
from natsconn_nats.source import NatsSource

from .support import (
    NATS_PASSWORD,
    NATS_TOKEN,
    NATS_USER,
    Certs,
    assert_pipelines_refused,
    connect_error,
    connects,
)

pytestmark = pytest.mark.integration

PLAIN_URL = "nats://127.0.0.1:4222"  # the shared plain server: no TLS at all
AUTH_MONITOR = "http://127.0.0.1:8224"


def _fresh_seed() -> str:
    """An NKey user seed the server does not know."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def _sink(**options: Any) -> NatsSink:
    return NatsSink.make_test_instance(subject="sec.x", connect_timeout=3,
                                       reconnect_wait="200ms", **options)


def _ssl(certs: Certs, *, client: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs.ca)
    if client:
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
    return ctx


async def _raw_tls(url: str, certs: Certs) -> NATS:
    return await nats.connect(url, tls=_ssl(certs), connect_timeout=5,
                              max_reconnect_attempts=2)


def _bad_cases(certs: Certs, tls_url: str, auth_url: str, token_url: str
               ) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """name -> (options, words the error must hold)."""
    auth_host = auth_url.removeprefix("nats://")
    token_host = token_url.removeprefix("nats://")
    return {
        "no client certificate": (
            {"servers": [tls_url], "tls": {"ca_file": certs.ca}},
            # the "certificate required" alert, or (TLS 1.3, by timing) a reset that
            # the plugin explains as a missing client certificate
            ["TLS", "certificate"]),
        "untrusted server certificate": (
            {"servers": [tls_url], "tls": certs.mtls(ca_file=certs.rogue_ca)},
            ["TLS", "certificate verify failed"]),
        "system trust store only": (
            {"servers": [tls_url]},
            ["TLS", "certificate verify failed"]),
        "client certificate of an unknown CA": (
            {"servers": [tls_url], "tls": certs.mtls(cert_file=certs.rogue_client_cert,
                                                     key_file=certs.rogue_client_key)},
            ["TLS", "unknown ca"]),
        "host name not in the certificate": (
            {"servers": [tls_url.replace("127.0.0.1", "localhost")], "tls": certs.mtls()},
            ["TLS", "Hostname mismatch"]),
        "tls.hostname not in the certificate": (
            {"servers": [tls_url], "tls": certs.mtls(hostname="evil.example")},
            ["TLS", "evil.example"]),
        "tls block against a plain server": (
            {"servers": [PLAIN_URL], "tls": {"ca_file": certs.ca}},
            ["refusing to connect in plain text"]),
        "tls:// URL against a plain server": (
            {"servers": [PLAIN_URL.replace("nats://", "tls://")]},
            ["refusing to connect in plain text"]),
        "wrong password": (
            {"servers": [auth_url], "user": NATS_USER, "password": "wrong-nats-pw-1"},
            ["Authorization Violation"]),
        "wrong password in the URL": (
            {"servers": [f"nats://{NATS_USER}:wrong-nats-pw-2@{auth_host}"]},
            ["Authorization Violation"]),
        "no credentials": ({"servers": [auth_url]}, ["Authorization Violation"]),
        "wrong token": (
            {"servers": [token_url], "token": "wrong-nats-token-3"},
            ["Authorization Violation"]),
        "wrong token in the URL": (
            {"servers": [f"nats://wrong-nats-token-4@{token_host}"]},
            ["Authorization Violation"]),
        "unknown nkey": (
            {"servers": [auth_url], "nkey_seed": _fresh_seed()},
            ["Authorization Violation"]),
    }


SECRETS = ["wrong-nats-pw-1", "wrong-nats-pw-2", "wrong-nats-token-3", "wrong-nats-token-4",
           NATS_PASSWORD, NATS_TOKEN]


async def test_bad_credentials_and_certificates_are_one_clear_error(
        certs: Certs, nats_tls_url: str, nats_auth_url: str, nats_token_url: str) -> None:
    """Each bad case fails connect() quickly with the cause, never the secret."""
    cases = _bad_cases(certs, nats_tls_url, nats_auth_url, nats_token_url)
    for name, (options, words) in cases.items():
        loop = asyncio.get_running_loop()
        started = loop.time()
        text = await connect_error(_sink(**options), *words, timeout=40)
        took = loop.time() - started
        assert took < 30, f"{name}: took {took:.1f}s to fail"
        assert "cannot connect to NATS at" in text, (name, text)
        for secret in [*SECRETS, options.get("nkey_seed", "-")]:
            assert secret not in text, (name, text)


@pytest.mark.parametrize("plugin", [NatsSink, NatsSource, JetStreamSink, JetStreamSource])
async def test_every_nats_plugin_refuses_plain_text(certs: Certs, plugin: Any,
                                                    unique: str) -> None:
    """A server without TLS, a plugin with TLS configured: an error, no plain text."""
    options: dict[str, Any] = {"servers": [PLAIN_URL], "tls": {"ca_file": certs.ca},
                               "user": NATS_USER, "password": NATS_PASSWORD,
                               "connect_timeout": 3}
    if plugin is NatsSource:
        options["subjects"] = [f"sec.{unique}"]
    if plugin is JetStreamSource:
        options.update(stream=f"SEC_{unique}", subjects=[f"sec.{unique}"])
    await connect_error(plugin.make_test_instance(**options),
                        "refusing to connect in plain text")


async def test_good_credentials_connect(certs: Certs, nats_tls_url: str, nats_auth_url: str,
                                        nats_token_url: str) -> None:
    auth_host = nats_auth_url.removeprefix("nats://")
    token_host = nats_token_url.removeprefix("nats://")
    for options in (
        {"servers": [nats_tls_url], "tls": certs.mtls()},
        # The certificate's DNS name, while connecting to 127.0.0.1.
        {"servers": [nats_tls_url], "tls": certs.mtls(hostname="natsconn.test")},
        {"servers": [nats_auth_url], "user": NATS_USER, "password": NATS_PASSWORD},
        {"servers": [f"nats://{NATS_USER}:{NATS_PASSWORD}@{auth_host}"]},
        {"servers": [nats_auth_url], "nkey_seed": certs.nkey_seed},
        {"servers": [nats_token_url], "token": NATS_TOKEN},
        {"servers": [f"nats://{NATS_TOKEN}@{token_host}"]},
    ):
        await connects(_sink(**options))


def _connz() -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{AUTH_MONITOR}/connz?auth=1", timeout=5) as resp:
        return list(json.load(resp).get("connections") or [])


async def test_tls_offered_is_used(certs: Certs, nats_auth_url: str, unique: str) -> None:
    """The auth server offers TLS without requiring it: a plugin with a tls block
    upgrades (the server sees a TLS client); one without stays plain."""
    secure = _sink(servers=[nats_auth_url], nkey_seed=certs.nkey_seed,
                   tls={"ca_file": certs.ca}, name=f"sec-tls-{unique}")
    plain = _sink(servers=[nats_auth_url], user=NATS_USER, password=NATS_PASSWORD,
                  name=f"sec-plain-{unique}")
    await secure.connect()
    await plain.connect()
    try:
        conns = {c.get("name"): c for c in _connz()}
        assert conns[f"sec-tls-{unique}"].get("tls_version"), conns[f"sec-tls-{unique}"]
        assert not conns[f"sec-plain-{unique}"].get("tls_version"), conns[f"sec-plain-{unique}"]
    finally:
        await secure.close()
        await plain.close()


async def test_pipelines_over_tls_and_auth(
        certs: Certs, nats_tls_url: str, nats_auth_url: str, nats_token_url: str,
        unique: str, tmp_path: Path) -> None:
    """natsconn run: JetStream with client certificates, core NATS with a password
    read from a file, an NKey (TLS upgrade) and a token; everything arrives and
    no credential shows in the debug log."""
    password_file = tmp_path / "nats-password"
    password_file.write_text(NATS_PASSWORD + "\n")
    mtls = {"servers": [nats_tls_url], "tls": certs.mtls()}
    file = pipeline_file(tmp_path, [
        {"name": f"js-mtls-{unique}",
         "source": {"type": "jetstream", **mtls, "stream": f"SECIN_{unique}",
                    "subjects": [f"secin.{unique}.>"]},
         "sink": {"type": "jetstream", **mtls, "subject": f"secout.{unique}.{{subject[2]}}",
                  "stream": f"SECOUT_{unique}", "stream_subjects": [f"secout.{unique}.>"]}},
        {"name": f"user-to-token-{unique}",
         "source": {"type": "nats", "servers": [nats_auth_url], "user": NATS_USER,
                    "password": f"${{file:{password_file}}}", "subjects": [f"secuser.{unique}"]},
         "sink": {"type": "nats", "servers": [nats_token_url], "token": "${SEC_NATS_TOKEN}",
                  "subject": f"sectoken.{unique}"}},
        {"name": f"nkey-tls-{unique}",
         "source": {"type": "nats", "servers": [nats_auth_url], "nkey_seed": certs.nkey_seed,
                    "tls": {"ca_file": certs.ca}, "subjects": [f"secnkey.{unique}"]},
         "sink": {"type": "jetstream", **mtls, "subject": f"secout.{unique}.nkey"}},
    ], log={"level": "debug"}, shutdown_timeout="3s")
    js_nc = await _raw_tls(nats_tls_url, certs)
    auth_nc = await nats.connect(nats_auth_url, user=NATS_USER, password=NATS_PASSWORD)
    token_nc = await nats.connect(nats_token_url, token=NATS_TOKEN)
    got: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.data)

    try:
        await token_nc.subscribe(f"sectoken.{unique}", cb=on_msg)
        await token_nc.flush()
        await js_nc.jetstream().add_stream(name=f"SECIN_{unique}",
                                           subjects=[f"secin.{unique}.>"])
        await publish_js(js_nc, f"secin.{unique}.a", 200)
        async with natsconn_process(file, env={"SEC_NATS_TOKEN": NATS_TOKEN}) as proc:
            for i in range(50):
                await auth_nc.publish(f"secuser.{unique}", b"user-%d" % i)
                await auth_nc.publish(f"secnkey.{unique}", b"nkey-%d" % i)
            await auth_nc.flush()
            await wait_until(lambda: len(got) >= 50, 20, "50 messages via user -> token")
            await wait_stream_count(js_nc, f"SECOUT_{unique}", 250, 30)
            log = proc.log()
        assert sorted(got) == sorted(b"user-%d" % i for i in range(50))
        out = await read_stream(js_nc, f"SECOUT_{unique}")
        subjects = {m.subject for m in out}
        assert subjects == {f"secout.{unique}.a", f"secout.{unique}.nkey"}, subjects
        assert len(out) == 250
        for secret in (NATS_PASSWORD, NATS_TOKEN, certs.nkey_seed):
            assert secret not in log
    finally:
        for stream in (f"SECIN_{unique}", f"SECOUT_{unique}"):
            with contextlib.suppress(Exception):
                await js_nc.jetstream().delete_stream(stream)
        for nc in (js_nc, auth_nc, token_nc):
            await nc.close()


async def test_natsconn_run_names_the_pipeline_and_stays_not_ready(
        certs: Certs, nats_tls_url: str, nats_auth_url: str, nats_token_url: str,
        unique: str, tmp_path: Path) -> None:
    """Every bad case as a pipeline of one natsconn process: each logs one connect
    error naming it and the cause; /readyz stays 503."""
    cases = _bad_cases(certs, nats_tls_url, nats_auth_url, nats_token_url)
    pipelines: list[dict[str, Any]] = []
    causes: dict[str, list[str]] = {}
    for i, (options, words) in enumerate(cases.values()):
        name = f"bad{i:02d}-{unique}"
        pipelines.append({"name": name, "source": {"type": "generate", "rate": 1},
                          "sink": {"type": "nats", "subject": "sec.x", "connect_timeout": 3,
                                   "reconnect_wait": "200ms", **options}})
        causes[name] = [*words, "could not connect"]
    await assert_pipelines_refused(tmp_path, pipelines, causes, secrets=SECRETS)
