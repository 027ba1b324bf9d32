"""Kafka: SASL SCRAM over TLS (SASL_SSL) on the second broker of ``scripts/services
start kafka-tls``. Wrong credentials, an untrusted or mismatched certificate and
a protocol that does not match the listener are each one clear error; /readyz
stays 503; nothing falls back to plain text."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
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
from natsconn_kafka.sink import KafkaSink
from natsconn_kafka.source import KafkaSource

from .support import (
    KAFKA_PASSWORD,
    KAFKA_USER,
    Certs,
    assert_pipelines_refused,
    connect_error,
    connects,
)

pytestmark = pytest.mark.integration

N = 500


def _secure(bootstrap: str, certs: Certs, **override: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": [bootstrap], "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "username": KAFKA_USER,
        "password": KAFKA_PASSWORD, "tls": {"ca_file": certs.ca}, "connect_timeout": 10,
    }
    options.update(override)
    return {k: v for k, v in options.items() if v is not None}


def _bad_cases(bootstrap: str, certs: Certs) -> dict[str, tuple[dict[str, Any], list[str]]]:
    localhost = bootstrap.replace("127.0.0.1", "localhost")
    return {
        "wrong password": (_secure(bootstrap, certs, password="wrong-kafka-pw-1"),
                           ["SaslAuthenticationFailed", "invalid credentials"]),
        "unknown user": (_secure(bootstrap, certs, username="nobody"),
                         ["SaslAuthenticationFailed"]),
        "SCRAM-SHA-256, wrong password": (
            _secure(bootstrap, certs, sasl_mechanism="SCRAM-SHA-256",
                    password="wrong-kafka-pw-2"), ["SaslAuthenticationFailed"]),
        "untrusted broker certificate": (
            _secure(bootstrap, certs, tls={"ca_file": certs.rogue_ca}),
            ["certificate verify failed"]),
        "system trust store only": (_secure(bootstrap, certs, tls=None),
                                    ["certificate verify failed"]),
        "host name not in the certificate": (
            _secure(localhost, certs), ["Hostname mismatch"]),
        "SASL_PLAINTEXT against the TLS listener": (
            _secure(bootstrap, certs, security_protocol="SASL_PLAINTEXT", tls=None),
            ["closed", "SSL or SASL_SSL"]),
        "PLAINTEXT against the TLS listener": (
            {"bootstrap_servers": [bootstrap], "connect_timeout": 10},
            ["closed", "SSL or SASL_SSL"]),
        "SASL_SSL against the plain SASL listener": (
            _secure("127.0.0.1:9094", certs, username="natsconn",
                    password="natsconn-secret"),
            ["TLS handshake", "is this a TLS listener"]),
        "SSL against the plain listener": (
            {"bootstrap_servers": ["127.0.0.1:9092"], "security_protocol": "SSL",
             "tls": {"ca_file": certs.ca}, "connect_timeout": 10},
            ["TLS handshake"]),
        "PLAIN mechanism not enabled": (_secure(bootstrap, certs, sasl_mechanism="PLAIN"),
                                        ["UnsupportedSaslMechanism"]),
    }


SECRETS = ["wrong-kafka-pw-1", "wrong-kafka-pw-2", KAFKA_PASSWORD, "natsconn-secret"]


async def _create_topic(bootstrap: str, certs: Certs, name: str) -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=KAFKA_USER,
        sasl_plain_password=KAFKA_PASSWORD,
        ssl_context=ssl.create_default_context(cafile=certs.ca))
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(name, 2, 1)])
    finally:
        await admin.close()


async def test_bad_credentials_and_certificates_are_one_clear_error(
        certs: Certs, kafka_ssl_bootstrap: str, unique: str) -> None:
    for name, (options, words) in _bad_cases(kafka_ssl_bootstrap, certs).items():
        for plugin in (KafkaSink.make_test_instance(topic=f"sec-{unique}", **options),
                       KafkaSource.make_test_instance(topics=[f"sec-{unique}"], **options)):
            text = await connect_error(plugin, *words, timeout=45)
            assert "cannot start Kafka" in text, (name, text)
            for secret in SECRETS:
                assert secret not in text, (name, text)


async def test_good_credentials_connect(certs: Certs, kafka_ssl_bootstrap: str,
                                        unique: str) -> None:
    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        options = _secure(kafka_ssl_bootstrap, certs, sasl_mechanism=mechanism)
        await connects(KafkaSink.make_test_instance(topic=f"sec-{unique}", **options))
    # tls.check_hostname: false is the documented, explicit opt-out for a name that
    # is not in the certificate; the chain is still verified.
    localhost = kafka_ssl_bootstrap.replace("127.0.0.1", "localhost")
    await connects(KafkaSink.make_test_instance(
        topic=f"sec-{unique}", **_secure(localhost, certs, tls={
            "ca_file": certs.ca, "check_hostname": False})))
    await connect_error(KafkaSink.make_test_instance(
        topic=f"sec-{unique}", **_secure(localhost, certs, tls={
            "ca_file": certs.rogue_ca, "check_hostname": False})),
        "certificate verify failed")


async def test_round_trip_over_sasl_ssl(
        nc: NATS, nats_url: str, certs: Certs, kafka_ssl_bootstrap: str, unique: str,
        tmp_path: Path) -> None:
    """JetStream -> Kafka (SASL_SSL) -> JetStream through natsconn run; the password
    comes from a file and never shows in the log."""
    topic = f"sec-{unique}"
    await _create_topic(kafka_ssl_bootstrap, certs, topic)
    password_file = tmp_path / "kafka-password"
    password_file.write_text(KAFKA_PASSWORD)
    secure = _secure(kafka_ssl_bootstrap, certs, password=f"${{file:{password_file}}}")
    await create_stream(nc, f"SECK_IN_{unique}", [f"seckin.{unique}"])
    await create_stream(nc, f"SECK_OUT_{unique}", [f"seckout.{unique}"])
    await publish_js(nc, f"seckin.{unique}", N)
    file = pipeline_file(tmp_path, [
        {"name": f"to-kafka-{unique}",
         "source": {"type": "jetstream", "servers": [nats_url], "stream": f"SECK_IN_{unique}"},
         "sink": {"type": "kafka", "topic": topic, **secure}},
        {"name": f"from-kafka-{unique}",
         "source": {"type": "kafka", "topics": [topic], **secure},
         "sink": {"type": "jetstream", "servers": [nats_url], "subject": f"seckout.{unique}"}},
    ], log={"level": "debug"}, shutdown_timeout="5s")
    try:
        async with natsconn_process(file) as proc:
            await wait_stream_count(nc, f"SECK_OUT_{unique}", N, 60)
            log = proc.log()
        seqs = [seq_of(m.data) for m in await read_stream(nc, f"SECK_OUT_{unique}")]
        assert_exactly(seqs, N, "JetStream -> Kafka SASL_SSL -> JetStream")
        assert KAFKA_PASSWORD not in log
    finally:
        for stream in (f"SECK_IN_{unique}", f"SECK_OUT_{unique}"):
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(stream)


async def test_natsconn_run_names_the_pipeline_and_stays_not_ready(
        certs: Certs, kafka_ssl_bootstrap: str, unique: str, tmp_path: Path) -> None:
    pipelines: list[dict[str, Any]] = []
    causes: dict[str, list[str]] = {}
    for i, (options, words) in enumerate(_bad_cases(kafka_ssl_bootstrap, certs).values()):
        name = f"bad{i:02d}-{unique}"
        pipelines.append({"name": name, "source": {"type": "generate", "rate": 1},
                          "sink": {"type": "kafka", "topic": f"sec-{unique}", **options}})
        causes[name] = [*words, "could not connect"]
    await assert_pipelines_refused(tmp_path, pipelines, causes, secrets=SECRETS)
