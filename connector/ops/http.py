"""The one HTTP listener: /healthz, /readyz, /metrics, and the admin API and page.

A small HTTP/1.1 server on asyncio streams rather than a web framework: one
request per connection, bounded in size and time so that an unruly client
cannot hold the listener (a request head over 16 KiB or a body over 64 KiB is
refused, a client that sends nothing for 5 s is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .admin import AdminApi, Response, problem, reason
from .metrics import REGISTRY

log = logging.getLogger("natsconn.http")

ReadyCheck = Callable[[], tuple[bool, dict[str, str]]]
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024


class OpsServer:
    def __init__(self, address: str, ready: ReadyCheck, admin: AdminApi | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.host = host or "0.0.0.0"
        self.port = int(port)
        self._ready = ready
        self._admin = admin
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_HEAD)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        extra = " / /pipelines /openapi.json" if self._admin is not None else ""
        log.info("ops endpoint listening on http://%s:%d (/healthz /readyz /metrics%s)",
                 self.host, self.port, extra)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            except (asyncio.LimitOverrunError, ValueError):
                await self._send(writer, "GET", problem(413, "request head too large", "/"))
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, *_ = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            path, _, query = target.partition("?")
            body = b""
            length = headers.get("content-length", "0")
            if not length.isdigit() or int(length) > MAX_BODY:
                await self._send(writer, method, problem(413, "request body too large", path))
                return
            if int(length):
                body = await asyncio.wait_for(reader.readexactly(int(length)), 5)
            response = await self._route(method, path, headers, query, body)
            await self._send(writer, method, response)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, method: str, r: Response) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in r.headers.items())
        head = (f"HTTP/1.1 {r.status} {reason(r.status)}\r\nContent-Type: {r.content_type}\r\n"
                f"Content-Length: {len(r.body)}\r\nCache-Control: no-store\r\n{extra}"
                "Connection: close\r\n\r\n")
        writer.write(head.encode() + (r.body if method != "HEAD" else b""))
        await writer.drain()

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready or not, and the body's details (a subclass asks its workers)."""
        ok, states = self._ready()
        return ok, {"pipelines": states}

    def _metrics(self) -> bytes:
        return generate_latest(REGISTRY)

    async def _route(self, method: str, path: str, headers: dict[str, str], query: str,
                     body: bytes) -> Response:
        if path in ("/healthz", "/readyz", "/metrics"):
            if method not in ("GET", "HEAD"):
                return Response(405, "text/plain", b"method not allowed\n")
            if path == "/healthz":
                return Response(200, "text/plain", b"ok\n")
            if path == "/readyz":
                ok, details = await self._readiness()
                doc = json.dumps({"ready": ok, **details}).encode() + b"\n"
                return Response(200 if ok else 503, "application/json", doc)
            return Response(200, CONTENT_TYPE_LATEST, self._metrics())
        return await self._rest(method, path, headers, query, body)

    async def _rest(self, method: str, path: str, headers: dict[str, str], query: str,
                    body: bytes) -> Response:
        """Everything but the three probe paths: the admin API and the page."""
        if self._admin is not None:
            form = _form(headers, body)
            from_page = form is not None and "token" in form
            if from_page and "authorization" not in headers:
                # The status page's buttons: a plain HTML form carries the token.
                headers = {**headers, "authorization": f"Bearer {form['token']}"}  # type: ignore[index]
            response = await self._admin.handle(method, path, headers, query)
            if response is not None:
                if from_page and response.status < 400 and method == "POST":
                    return Response(303, "text/plain", b"see /\n", {"Location": "/"})
                return response
        return Response(404, "text/plain",
                        b"not found: try /healthz, /readyz, /metrics, /pipelines\n")


def _form(headers: dict[str, str], body: bytes) -> dict[str, str] | None:
    if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return None
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}
