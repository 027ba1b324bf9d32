"""Smoke check of the schema registry that ``scripts/services start registry``
runs (Apicurio Registry's Confluent-compatible API): register an Avro schema,
fetch it back by id, and see the registry refuse an incompatible one once the
subject is set to BACKWARD compatibility.

The base URL comes from ``NATSCONN_REGISTRY_URL`` (``scripts/services env``),
by default ``http://127.0.0.1:8081/apis/ccompat/v7``. A registry that does not
answer is a failure that says how to start it, never a skip. Only the stdlib's
urllib talks to it, so the check depends on no registry client.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.integration

DEFAULT_URL = "http://127.0.0.1:8081/apis/ccompat/v7"
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

V1 = {"type": "record", "name": "Order", "namespace": "natsconn.smoke",
      "fields": [{"name": "id", "type": "string"}]}
# A new field with a default: readers of V2 can still read V1 data (BACKWARD).
V2_COMPATIBLE = {**V1, "fields": [*V1["fields"],
                                  {"name": "note", "type": "string", "default": ""}]}
# A new field without a default: not BACKWARD compatible with V1.
V2_INCOMPATIBLE = {**V1, "fields": [*V1["fields"], {"name": "qty", "type": "int"}]}


class RegistryError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def call(base: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": CONTENT_TYPE,
                                              "Accept": CONTENT_TYPE})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        raise RegistryError(exc.code, payload) from None


@pytest.fixture
def registry_url() -> str:
    """``NATSCONN_REGISTRY_URL``, checked to answer a read of the subject list."""
    base = (os.environ.get("NATSCONN_REGISTRY_URL") or DEFAULT_URL).rstrip("/")
    try:
        subjects = call(base, "GET", "/subjects")
    except (OSError, RegistryError) as exc:
        source = ("NATSCONN_REGISTRY_URL" if os.environ.get("NATSCONN_REGISTRY_URL")
                  else "default; set NATSCONN_REGISTRY_URL to change it")
        pytest.fail(f"schema registry is not answering at {base} ({source}): {exc}. "
                    "Start it with `scripts/services start registry`.", pytrace=False)
    assert isinstance(subjects, list), subjects
    return base


@pytest.fixture
def subject(registry_url: str, unique: str) -> Iterator[str]:
    name = f"natsconn-smoke-{unique}-value"
    yield name
    for path in (f"/subjects/{name}", f"/subjects/{name}?permanent=true"):
        with contextlib.suppress(RegistryError):
            call(registry_url, "DELETE", path)


def register(base: str, subject: str, schema: dict[str, Any]) -> int:
    answer = call(base, "POST", f"/subjects/{subject}/versions",
                  {"schemaType": "AVRO", "schema": json.dumps(schema)})
    assert isinstance(answer.get("id"), int), answer
    return int(answer["id"])


def is_compatible(base: str, subject: str, schema: dict[str, Any]) -> bool:
    answer = call(base, "POST", f"/compatibility/subjects/{subject}/versions/latest",
                  {"schemaType": "AVRO", "schema": json.dumps(schema)})
    return bool(answer["is_compatible"])


def test_register_fetch_and_compatibility(registry_url: str, subject: str) -> None:
    schema_id = register(registry_url, subject, V1)
    # The same schema again is the same id, not a new version.
    assert register(registry_url, subject, V1) == schema_id
    assert call(registry_url, "GET", f"/subjects/{subject}/versions") == [1]

    fetched = call(registry_url, "GET", f"/schemas/ids/{schema_id}")
    assert json.loads(fetched["schema"]) == V1
    assert fetched.get("schemaType", "AVRO") == "AVRO"
    latest = call(registry_url, "GET", f"/subjects/{subject}/versions/latest")
    assert (latest["subject"], latest["version"], latest["id"]) == (subject, 1, schema_id)

    config = call(registry_url, "PUT", f"/config/{subject}", {"compatibility": "BACKWARD"})
    # Confluent answers {"compatibility": ...}, Apicurio {"compatibilityLevel": ...}.
    assert config.get("compatibility", config.get("compatibilityLevel")) == "BACKWARD", config
    assert call(registry_url, "GET", f"/config/{subject}")["compatibilityLevel"] == "BACKWARD"

    assert is_compatible(registry_url, subject, V2_COMPATIBLE)
    assert not is_compatible(registry_url, subject, V2_INCOMPATIBLE)

    with pytest.raises(RegistryError) as refused:
        register(registry_url, subject, V2_INCOMPATIBLE)
    assert refused.value.status == 409, refused.value
    assert refused.value.body["error_code"] == 409, refused.value.body
    assert isinstance(refused.value.body["message"], str)
    assert call(registry_url, "GET", f"/subjects/{subject}/versions") == [1]

    assert register(registry_url, subject, V2_COMPATIBLE) != schema_id
    assert call(registry_url, "GET", f"/subjects/{subject}/versions") == [1, 2]


def test_errors_are_confluent_shaped(registry_url: str, subject: str) -> None:
    with pytest.raises(RegistryError) as invalid:
        call(registry_url, "POST", f"/subjects/{subject}/versions",
             {"schemaType": "AVRO", "schema": "{not json"})
    assert invalid.value.status == 422, invalid.value
    assert invalid.value.body["error_code"] == 42201, invalid.value.body

    with pytest.raises(RegistryError) as missing:
        call(registry_url, "GET", "/schemas/ids/2147483000")
    assert missing.value.status == 404, missing.value
    assert missing.value.body["error_code"] == 40403, missing.value.body

    with pytest.raises(RegistryError) as no_subject:
        call(registry_url, "GET", f"/subjects/{subject}/versions")
    assert no_subject.value.status == 404, no_subject.value
    assert no_subject.value.body["error_code"] == 40401, no_subject.value.body
