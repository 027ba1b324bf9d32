"""One async client for a Confluent-compatible schema registry, shared by
``decode`` and ``encode``.

It speaks the Confluent REST API (Confluent Schema Registry, Apicurio's
``/apis/ccompat/v7``, Redpanda, Karapace):

- ``GET  /schemas/ids/{id}``                 a schema by id (cached for ever:
  an id never changes meaning)
- ``GET  /subjects/{s}/versions/latest``     a subject's latest version (cached
  for ``cache_ttl``: a new version may come)
- ``GET  /subjects/{s}/versions/{v}``        a referenced schema (cached for ever)
- ``POST /subjects/{s}``                     the id of a schema already
  registered under the subject (cached for ever)
- ``POST /subjects/{s}/versions``            register (``auto_register``)

Concurrent asks for one key share one request. Errors: a refusal of the schema
(409 incompatible, 422 invalid) is a :class:`RejectedError` carrying the
registry's own ``message``; a network error, a timeout, 429 or a 5xx is a
:class:`RetryableError`; anything else a :class:`ConnectorError`. Neither the
password nor a URL's user info ever appears in an error or a log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from connector import (
    ConnectorError,
    Duration,
    PluginConfig,
    RejectedError,
    RetryableError,
)

log = logging.getLogger("natsconn.codec.registry")

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
_ACCEPT = f"{_CONTENT_TYPE}, application/json"

T = TypeVar("T")


class RegistryConfig(PluginConfig):
    url: str = Field(description="base URL of the Confluent-compatible API, e.g. "
                                 "'http://127.0.0.1:8080/apis/ccompat/v7'")
    subject_strategy: Literal["topic", "record", "topic_record"] = Field(
        "topic", description="encode's subject name: topic '{subject}-value', record the "
                             "record's (message's) full name, topic_record '{subject}-{name}'")
    auto_register: bool = Field(False, description="encode registers schema_file's schema "
                                                   "under the subject when it is not there")
    cache_ttl: Duration = Field(300.0, description="how long a subject's latest version is "
                                                   "trusted; schemas by id are kept for ever")
    username: str | None = Field(None, description="HTTP basic auth user")
    password: SecretStr | None = Field(None, description="HTTP basic auth password")
    timeout: Duration = Field(10.0, description="per request")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        return value.rstrip("/")

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("expected a duration above 0")
        return value

    @model_validator(mode="after")
    def _auth_pair(self) -> RegistryConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("registry: username and password go together")
        return self


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    """A schema as the registry holds it."""

    id: int
    schema: str
    schema_type: str = "AVRO"  # AVRO, PROTOBUF or JSON (the API leaves it out for AVRO)
    references: tuple[Reference, ...] = ()
    subject: str | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class Reference:
    name: str
    subject: str
    version: int


class NotFound(ConnectorError):
    """404 from the registry: no such schema id, subject or version."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Flights:
    """Single flight: concurrent asks for one key await one task."""

    tasks: dict[Hashable, asyncio.Task[Any]] = field(default_factory=dict)

    async def run(self, key: Hashable, make: Callable[[], Awaitable[T]]) -> T:
        task = self.tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(make())
            self.tasks[key] = task

            def done(t: asyncio.Task[Any]) -> None:
                self.tasks.pop(key, None)
                if not t.cancelled():
                    t.exception()  # retrieved: the awaiters may all have been cancelled
            task.add_done_callback(done)
        result: T = await asyncio.shield(task)
        return result


class RegistryClient:
    """Async, caching client; ``connect()`` before use, ``close()`` after."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        parts = urlsplit(config.url)
        # The URL as errors show it: never with user info.
        self.where = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        self._auth: httpx.BasicAuth | None = None
        if config.username is not None and config.password is not None:
            self._auth = httpx.BasicAuth(config.username, config.password.get_secret_value())
        elif parts.username:
            self._auth = httpx.BasicAuth(parts.username, parts.password or "")
        self._base = self.where
        self._http: httpx.AsyncClient | None = None
        self._by_id: dict[int, RegisteredSchema] = {}
        self._missing_ids: dict[int, float] = {}  # id -> monotonic time it was found missing
        self._latest: dict[str, tuple[float, RegisteredSchema]] = {}
        self._versions: dict[tuple[str, int], RegisteredSchema] = {}
        self._ids: dict[tuple[str, str], int] = {}  # (subject, schema text) -> id
        self._flights = _Flights()
        self.requests = 0  # HTTP requests sent, for tests and metrics

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self._base, auth=self._auth, timeout=self.config.timeout,
                headers={"Accept": _ACCEPT}, follow_redirects=True)

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    # ------------------------------------------------------------------ cached, sync

    def cached_schema(self, schema_id: int) -> RegisteredSchema | None:
        return self._by_id.get(schema_id)

    def cached_latest(self, subject: str) -> RegisteredSchema | None:
        hit = self._latest.get(subject)
        if hit is None or time.monotonic() - hit[0] > self.config.cache_ttl:
            return None
        return hit[1]

    def cached_id(self, subject: str, schema: str) -> int | None:
        return self._ids.get((subject, schema))

    # ------------------------------------------------------------------ lookups

    async def schema_by_id(self, schema_id: int) -> RegisteredSchema:
        """The schema with ``schema_id``; :class:`RejectedError` when the registry has none."""
        hit = self._by_id.get(schema_id)
        if hit is not None:
            return hit
        missing = self._missing_ids.get(schema_id)
        if missing is not None and time.monotonic() - missing < self.config.cache_ttl:
            raise RejectedError(f"unknown schema id {schema_id}: the registry has no such schema")
        return await self._flights.run(("id", schema_id), lambda: self._fetch_id(schema_id))

    async def _fetch_id(self, schema_id: int) -> RegisteredSchema:
        try:
            body = await self._request("GET", f"/schemas/ids/{schema_id}")
        except NotFound:
            self._missing_ids[schema_id] = time.monotonic()
            raise RejectedError(
                f"unknown schema id {schema_id}: the registry has no such schema") from None
        found = _schema(body, schema_id=schema_id)
        self._by_id[schema_id] = found
        self._missing_ids.pop(schema_id, None)
        return found

    async def latest(self, subject: str) -> RegisteredSchema | None:
        """The subject's latest version (``None`` when the subject has none)."""
        hit = self.cached_latest(subject)
        if hit is not None:
            return hit
        return await self._flights.run(("latest", subject), lambda: self._fetch_latest(subject))

    async def _fetch_latest(self, subject: str) -> RegisteredSchema | None:
        try:
            body = await self._request("GET", f"/subjects/{_seg(subject)}/versions/latest")
        except NotFound:
            return None
        found = _schema(body)
        self._latest[subject] = (time.monotonic(), found)
        self._by_id.setdefault(found.id, found)
        return found

    async def version(self, subject: str, version: int) -> RegisteredSchema:
        """One version of a subject (a schema's reference)."""
        hit = self._versions.get((subject, version))
        if hit is not None:
            return hit
        return await self._flights.run(("version", subject, version),
                                       lambda: self._fetch_version(subject, version))

    async def _fetch_version(self, subject: str, version: int) -> RegisteredSchema:
        try:
            body = await self._request("GET", f"/subjects/{_seg(subject)}/versions/{version}")
        except NotFound:
            raise RejectedError(f"schema reference {subject!r} version {version} is not in "
                                "the registry") from None
        found = _schema(body)
        self._versions[(subject, version)] = found
        return found

    async def id_for(self, subject: str, schema: str, schema_type: str, *,
                     register: bool) -> int:
        """The id of ``schema`` under ``subject``: registered now when ``register``,
        else it must be there already (:class:`RejectedError` if not)."""
        hit = self._ids.get((subject, schema))
        if hit is not None:
            return hit
        return await self._flights.run(
            ("id_for", subject, schema, register),
            lambda: self._fetch_id_for(subject, schema, schema_type, register))

    async def _fetch_id_for(self, subject: str, schema: str, schema_type: str,
                            register: bool) -> int:
        payload: dict[str, Any] = {"schema": schema}
        if schema_type != "AVRO":
            payload["schemaType"] = schema_type
        if register:
            body = await self._request("POST", f"/subjects/{_seg(subject)}/versions",
                                       json=payload, subject=subject)
            log.info("registered a schema", extra={"subject": subject, "schema_id": body.get("id")})
        else:
            try:
                body = await self._request("POST", f"/subjects/{_seg(subject)}", json=payload,
                                           subject=subject)
            except NotFound as exc:
                raise RejectedError(
                    f"the schema is not registered under subject {subject!r} "
                    f"({exc}; auto_register is off)") from None
        schema_id = body.get("id")
        if not isinstance(schema_id, int):
            raise ConnectorError(f"schema registry {self.where}: answer without an id for "
                                 f"subject {subject!r}")
        self._ids[(subject, schema)] = schema_id
        return schema_id

    # ------------------------------------------------------------------ HTTP

    async def _request(self, method: str, path: str, *, json: Any = None,
                       subject: str | None = None) -> dict[str, Any]:
        if self._http is None:
            await self.connect()
        assert self._http is not None
        self.requests += 1
        try:
            response = await self._http.request(
                method, path, json=json,
                headers={"Content-Type": _CONTENT_TYPE} if json is not None else None)
        except httpx.TimeoutException as exc:
            raise RetryableError(f"schema registry {self.where}: {method} {path} timed out "
                                 f"({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise RetryableError(f"schema registry {self.where}: {method} {path} failed: "
                                 f"{type(exc).__name__}: {_no_secrets(str(exc))}") from None
        status = response.status_code
        body = _json(response)
        if status < 300:
            if not isinstance(body, dict):
                raise ConnectorError(f"schema registry {self.where}: {method} {path}: expected "
                                     f"a JSON object, found {response.text[:200]!r}")
            return body
        message, code = _error(body, response)
        what = f"{method} {path}: HTTP {status}" + (f", error code {code}" if code else "")
        if status == 404:
            raise NotFound(f"{what}: {message}", code)
        if status in (409, 422):
            about = f" for subject {subject!r}" if subject else ""
            raise RejectedError(f"schema registry refused the schema{about}: {message} "
                                f"(HTTP {status}" + (f", error code {code})" if code else ")"))
        if status == 429 or status >= 500:
            raise RetryableError(f"schema registry {self.where}: {what}: {message}",
                                 retry_after=_retry_after(response))
        hint = " (check registry.username and registry.password)" if status in (401, 403) else ""
        raise ConnectorError(f"schema registry {self.where}: {what}: {message}{hint}")


def _seg(subject: str) -> str:
    return quote(subject, safe="")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error(body: Any, response: httpx.Response) -> tuple[str, int | None]:
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("title")
        code = body.get("error_code")
        if message:
            return str(message), code if isinstance(code, int) else None
    return (response.text[:300] or response.reason_phrase), None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _no_secrets(text: str) -> str:
    # httpx errors may quote the URL; drop any user info from it.
    return re.sub(r"://[^/@\s]*@", "://", text)


def _schema(body: dict[str, Any], schema_id: int | None = None) -> RegisteredSchema:
    refs = tuple(
        Reference(str(r.get("name")), str(r.get("subject")), int(r.get("version", 0)))
        for r in body.get("references") or ()
    )
    found_id = body.get("id", schema_id)
    text = body.get("schema")
    if not isinstance(found_id, int) or not isinstance(text, str):
        raise ConnectorError(f"schema registry answer lacks an id or a schema: keys "
                             f"{sorted(body)}")
    return RegisteredSchema(
        id=found_id, schema=text, schema_type=str(body.get("schemaType") or "AVRO"),
        references=refs, subject=body.get("subject"), version=body.get("version"))
