"""SASL_SSL (SCRAM over TLS) against the second broker ``scripts/services start
kafka-tls`` runs on 9194, with the throwaway CA in ``$NATSCONN_TLS_DIR``: the sink
and the source work through it, and a broker certificate signed by another CA is
refused with a clear error (verification cannot be turned off)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from natsconn_kafka.sink import KafkaSink
from natsconn_kafka.source import KafkaSource

from connector import Message, RetryableError
from connector.testing.kit import collect

pytestmark = pytest.mark.integration

USER, PASSWORD = "natsconn-tls", "natsconn-tls-pw"
SERVICES = Path(__file__).resolve().parents[3] / "scripts" / "services"


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def tls_bootstrap() -> str:
    """The SASL_SSL broker; started here when it is not running (``scripts/services
    start all`` starts only the plain servers), a failure if it cannot be."""
    address = os.environ.get("KAFKA_SSL_BOOTSTRAP", "127.0.0.1:9194")
    host, _, port = address.rpartition(":")
    if not _reachable(host, int(port)):
        started = subprocess.run([str(SERVICES), "start", "kafka-tls"], capture_output=True,
                                 text=True, timeout=300, check=False)
        if started.returncode != 0 or not _reachable(host, int(port)):
            pytest.fail(f"no Kafka SASL_SSL broker at {address}, and `scripts/services start "
                        f"kafka-tls` did not bring one up:\n{started.stdout}{started.stderr}",
                        pytrace=False)
    return address


@pytest.fixture
def tls_dir() -> Path:
    default = Path.home() / ".cache" / "natsconn" / "state" / "tls"
    return Path(os.environ.get("NATSCONN_TLS_DIR", default))


def options(bootstrap: str, ca: Path) -> dict[str, Any]:
    return {"bootstrap_servers": [bootstrap], "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512", "username": USER, "password": PASSWORD,
            "tls": {"ca_file": str(ca)}, "connect_timeout": "10s"}


async def test_sasl_ssl_round_trip(tls_bootstrap: str, tls_dir: Path, unique: str) -> None:
    topic = f"tls-{unique}"
    sink = KafkaSink.make_test_instance(**options(tls_bootstrap, tls_dir / "ca.pem"),
                                        topic=topic)
    await sink.connect()
    try:
        await sink.write_batch([Message(b"m%d" % i, "a", b"k", {"H": "v"}, time.time())
                                for i in range(20)])
    finally:
        await sink.close()
    source = KafkaSource.make_test_instance(**options(tls_bootstrap, tls_dir / "ca.pem"),
                                            topics=[topic], group_id=f"tls-{unique}")
    await source.connect()
    try:
        got = await collect(source, 20, 20.0)
    finally:
        await source.close()
    assert sorted(m.data for m in got) == sorted(b"m%d" % i for i in range(20))
    assert all(m.key == b"k" and m.headers == {"H": "v"} for m in got)


async def test_certificate_from_another_ca_is_refused(tls_bootstrap: str, tls_dir: Path,
                                                       unique: str) -> None:
    sink = KafkaSink.make_test_instance(**options(tls_bootstrap, tls_dir / "rogue-ca.pem"),
                                        topic=f"tls-{unique}")
    with pytest.raises(RetryableError, match=r"CERTIFICATE_VERIFY_FAILED"):
        await sink.connect()
    await sink.close()
