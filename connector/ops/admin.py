"""The admin API on the ops listener: read the pipelines, pause, resume, restart, reload.

Reads are open unless ``http.read_token_required``; every mutation needs
``Authorization: Bearer <token>`` with the token from ``http.admin_token_file``
or ``NATSCONN_ADMIN_TOKEN``. Without a token configured the API is read-only.
Errors are RFC 9457 problem documents (``application/problem+json``).
The shapes are in openapi.py, served at ``/openapi.json``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.reload import Reloader
from ..engine.supervisor import Supervisor
from .openapi import document as openapi_document
from .page import render as render_page
from .status import History, all_status, pipeline_status

JSON = "application/json"
PROBLEM = "application/problem+json"


@dataclass(slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Content Too Large", 422: "Unprocessable Content",
            503: "Service Unavailable"}


def reason(status: int) -> str:
    return _REASONS.get(status, "Error")


def problem(status: int, detail: str, instance: str, **extra: Any) -> Response:
    doc = {"type": "about:blank", "title": reason(status), "status": status,
           "detail": detail, "instance": instance, **extra}
    headers = {"WWW-Authenticate": 'Bearer realm="natsconn"'} if status == 401 else {}
    return Response(status, PROBLEM, json.dumps(doc).encode() + b"\n", headers)


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, JSON, json.dumps(value).encode() + b"\n")


class AdminApi:
    def __init__(self, supervisor: Supervisor, reloader: Reloader | None, history: History,
                 token: str | None, read_token_required: bool = False) -> None:
        self.supervisor = supervisor
        self.reloader = reloader
        self.history = history
        self._token = token.encode() if token else None
        self._read_token_required = read_token_required and self._token is not None

    @property
    def mutable(self) -> bool:
        return self._token is not None

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        if self._token is None:
            return False
        given = headers.get("authorization", "")
        scheme, _, credential = given.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credential.strip().encode(), self._token)

    async def handle(self, method: str, path: str, headers: Mapping[str, str],
                     query: str = "") -> Response | None:
        """A response for the admin routes, or None for a path that is not theirs."""
        parts = [p for p in path.split("/") if p]
        if path == "/openapi.json":
            if method not in ("GET", "HEAD"):
                return problem(405, "use GET", path)
            return _json(openapi_document())
        if path == "/" or (parts and parts[0] in ("pipelines", "reload", "status")):
            return await self._route(method, path, parts, headers, query)
        return None

    async def _route(self, method: str, path: str, parts: list[str],
                     headers: Mapping[str, str], query: str) -> Response:
        reading = method in ("GET", "HEAD")
        if reading and self._read_token_required and not self._authorized(headers):
            return problem(401, "this endpoint needs `Authorization: Bearer <token>`", path)
        sup = self.supervisor
        if path == "/":
            if not reading:
                return problem(405, "the status page is read with GET", path)
            # ?refresh=off: a page that stays put while a token is typed into it.
            still = "refresh=off" in query.split("&")
            html = render_page(all_status(sup, self.history), mutable=self.mutable,
                               reload=self.reloader.last.as_json() if self.reloader is not None
                               and self.reloader.last is not None else None,
                               **({"refresh": 0} if still else {}))
            return Response(200, "text/html; charset=utf-8", html.encode())
        if parts == ["pipelines"]:
            if not reading:
                return problem(405, "GET /pipelines lists them; POST to "
                               "/pipelines/{name}/pause|resume|restart", path)
            body: dict[str, Any] = {"pipelines": all_status(sup, self.history)}
            if self.reloader is not None and self.reloader.last is not None:
                body["last_reload"] = self.reloader.last.as_json()
            return _json(body)
        if parts == ["reload"]:
            if method != "POST":
                return problem(405, "reload with POST /reload", path)
            denied = self._deny(headers, path)
            if denied is not None:
                return denied
            if self.reloader is None:
                return problem(409, "this instance was not started from a file it can "
                               "reload", path)
            outcome = await self.reloader.reload()
            if not outcome.ok:
                return problem(422, outcome.error or "the file is invalid", path,
                               reload=outcome.as_json())
            return _json(outcome.as_json())
        if parts[0] == "pipelines" and len(parts) in (2, 3):
            name = parts[1]
            rec = sup.records.get(name)
            if rec is None:
                known = ", ".join(sup.records) or "none"
                return problem(404, f"no pipeline named {name!r} (running: {known})", path)
            if len(parts) == 2:
                if not reading:
                    return problem(405, f"GET /pipelines/{name}; POST to "
                                   f"/pipelines/{name}/pause|resume|restart", path)
                return _json(pipeline_status(name, rec, self.history))
            verb = parts[2]
            if verb not in ("pause", "resume", "restart"):
                return problem(404, f"unknown action {verb!r}: expected pause, resume or "
                               "restart", path)
            if method != "POST":
                return problem(405, f"{verb} with POST", path)
            denied = self._deny(headers, path)
            if denied is not None:
                return denied
            if verb == "pause":
                sup.pause(name)
            elif verb == "resume":
                sup.resume(name)
            else:
                sup.restart(name)
            return _json({"name": name, "action": verb, "accepted": True}, 202)
        return problem(404, f"no such endpoint {path!r}; see /openapi.json", path)

    def _deny(self, headers: Mapping[str, str], path: str) -> Response | None:
        if self._token is None:
            return problem(403, "the admin API is read-only: no admin token is configured "
                           "(http.admin_token_file or NATSCONN_ADMIN_TOKEN)", path)
        if not self._authorized(headers):
            return problem(401, "a mutation needs `Authorization: Bearer <token>`", path)
        return None
