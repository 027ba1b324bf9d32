"""The admin API and the status page without a browser: AdminApi.handle over a
Supervisor of fake plugins, the OpenAPI document (valid 3.1; every /pipelines
answer validates against its Pipeline schema), and the HTTP layer over a real
socket (limits, the page's form posts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from connector.config import load_text
from connector.engine.reload import Reloader
from connector.engine.supervisor import Supervisor
from connector.ops.admin import AdminApi, Response
from connector.ops.http import MAX_BODY, MAX_HEAD, OpsServer
from connector.ops.openapi import document
from connector.ops.status import History

from ._fakes import REGISTRY, until

TOKEN = "unit-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PIPELINE_FIELDS = ("state", "in_flight", "max_in_flight", "restarts", "written", "lag",
                   "dead_lettered", "read_per_second", "written_per_second")


def spec(name: str) -> dict[str, Any]:
    return {"name": name, "source": {"type": "fake", "per_read": 5, "pause": "2ms"},
            "sink": {"type": "fake"}, "in_progress_interval": 0,
            "batch": {"max_messages": 5, "max_wait": "1ms"}}


def text(*names: str) -> str:
    return yaml.safe_dump({"pipelines": [spec(n) for n in names],
                           "http": {"enabled": False}}, sort_keys=False)


@dataclass
class Bridge:
    supervisor: Supervisor
    history: History
    files: dict[str, str]

    def api(self, token: str | None = TOKEN, **kw: Any) -> AdminApi:
        reloader = Reloader(self.supervisor, "p.yaml",
                            load=lambda path: load_text(self.files[path], path, REGISTRY,
                                                        env={}))
        return AdminApi(self.supervisor, reloader, self.history, token, **kw)


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    files = {"p.yaml": text("alpha", "beta")}
    sup = Supervisor(load_text(files["p.yaml"], "p.yaml", REGISTRY, env={}))
    history = History()
    task = asyncio.create_task(sup.run())
    try:
        await until(lambda: sup.ready()[0])
        history.take(sup)
        await asyncio.sleep(0.05)
        history.take(sup)
        yield Bridge(sup, history, files)
    finally:
        sup.stop(timeout=1)
        await asyncio.wait_for(task, 5)


def body(r: Response | None) -> Any:
    assert r is not None
    return json.loads(r.body)


def assert_problem(r: Response | None, status: int, path: str) -> dict[str, Any]:
    """An RFC 9457 problem document: the content type and the members."""
    assert r is not None
    assert r.status == status, r.body
    assert r.content_type == "application/problem+json"
    doc: dict[str, Any] = json.loads(r.body)
    assert doc["status"] == status
    assert doc["type"] == "about:blank"
    assert isinstance(doc["title"], str) and doc["title"]
    assert isinstance(doc["detail"], str) and doc["detail"]
    assert doc["instance"] == path
    schema = {"$ref": "#/components/schemas/Problem", **_components()}
    Draft202012Validator(schema).validate(doc)
    return doc


def _components() -> dict[str, Any]:
    return {"components": document()["components"]}


def pipeline_validator() -> Draft202012Validator:
    doc = document()
    listing = doc["paths"]["/pipelines"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]
    one = doc["paths"]["/pipelines/{name}"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]
    schema = {"oneOf": [listing, one], **_components()}
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


# ---------------------------------------------------------------------------- auth


async def test_mutations_need_the_token(bridge: Bridge) -> None:
    api = bridge.api()
    path = "/pipelines/alpha/pause"
    doc = assert_problem(await api.handle("POST", path, {}), 401, path)
    assert TOKEN not in json.dumps(doc)
    r = await api.handle("POST", path, {})
    assert r is not None and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert_problem(await api.handle("POST", path, {"authorization": "Bearer wrong"}), 401,
                   path)
    assert_problem(await api.handle("POST", path, {"authorization": TOKEN}), 401, path)
    assert_problem(await api.handle("POST", path, {"authorization": f"Basic {TOKEN}"}), 401,
                   path)
    assert_problem(await api.handle("POST", "/reload", {}), 401, "/reload")
    assert not bridge.supervisor.records["alpha"].paused
    r = await api.handle("POST", path, AUTH)
    assert r is not None and r.status == 202
    assert body(r) == {"name": "alpha", "action": "pause", "accepted": True}
    assert bridge.supervisor.records["alpha"].paused
    # Reads are open by default.
    r = await api.handle("GET", "/pipelines", {})
    assert r is not None and r.status == 200


async def test_without_a_token_the_api_is_read_only(bridge: Bridge) -> None:
    api = bridge.api(token=None)
    assert not api.mutable
    for verb in ("pause", "resume", "restart"):
        path = f"/pipelines/alpha/{verb}"
        doc = assert_problem(await api.handle("POST", path, AUTH), 403, path)
        assert "read-only" in doc["detail"]
    assert_problem(await api.handle("POST", "/reload", AUTH), 403, "/reload")
    assert not bridge.supervisor.records["alpha"].paused
    r = await api.handle("GET", "/", {})
    assert r is not None and b"<form" not in r.body and b"read-only" in r.body


async def test_read_token_required_guards_reads_too(bridge: Bridge) -> None:
    api = bridge.api(read_token_required=True)
    for path in ("/", "/pipelines", "/pipelines/alpha"):
        assert_problem(await api.handle("GET", path, {}), 401, path)
        r = await api.handle("GET", path, AUTH)
        assert r is not None and r.status == 200


# ------------------------------------------------------------------ problems, 405s


async def test_an_unknown_pipeline_is_a_404_problem(bridge: Bridge) -> None:
    api = bridge.api()
    for method, path in (("GET", "/pipelines/nope"), ("POST", "/pipelines/nope/pause"),
                         ("POST", "/pipelines/nope/restart")):
        doc = assert_problem(await api.handle(method, path, AUTH), 404, path)
        assert "'nope'" in doc["detail"] and "alpha, beta" in doc["detail"]
    doc = assert_problem(await api.handle("POST", "/pipelines/alpha/explode", AUTH), 404,
                         "/pipelines/alpha/explode")
    assert "pause, resume or restart" in doc["detail"]
    assert_problem(await api.handle("GET", "/pipelines/alpha/pause/x", AUTH), 404,
                   "/pipelines/alpha/pause/x")
    assert await api.handle("GET", "/elsewhere", {}) is None, "not the admin API's path"


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/"), ("DELETE", "/pipelines"), ("PUT", "/pipelines/alpha"),
    ("GET", "/pipelines/alpha/pause"), ("GET", "/pipelines/alpha/restart"),
    ("GET", "/reload"), ("POST", "/openapi.json"),
])
async def test_wrong_methods_are_405_problems(bridge: Bridge, method: str, path: str) -> None:
    assert_problem(await bridge.api().handle(method, path, AUTH), 405, path)


# ------------------------------------------------------------------------- verbs


async def test_pause_then_resume(bridge: Bridge) -> None:
    api, sup = bridge.api(), bridge.supervisor
    r = await api.handle("POST", "/pipelines/alpha/pause", AUTH)
    assert r is not None and r.status == 202
    await until(lambda: body_of_state(sup, "alpha") == "paused")
    one = body(await api.handle("GET", "/pipelines/alpha", {}))
    assert one["state"] == "paused" and one["paused"] is True
    assert body_of_state(sup, "beta") == "running", "pausing one paused the other"
    page = await api.handle("GET", "/", {})
    assert page is not None
    assert b'action="/pipelines/alpha/resume"' in page.body
    assert b'action="/pipelines/alpha/pause"' not in page.body

    r = await api.handle("POST", "/pipelines/alpha/resume", AUTH)
    assert r is not None and r.status == 202
    assert body(r)["action"] == "resume"
    await until(lambda: body_of_state(sup, "alpha") == "running")
    one = body(await api.handle("GET", "/pipelines/alpha", {}))
    assert one["paused"] is False


def body_of_state(sup: Supervisor, name: str) -> str:
    pipe = sup.records[name].current
    return pipe.state.value if pipe is not None else "starting"


async def test_restart_counts_in_reloads_not_restarts(bridge: Bridge) -> None:
    api, sup = bridge.api(), bridge.supervisor
    first = sup.records["alpha"].current
    r = await api.handle("POST", "/pipelines/alpha/restart", AUTH)
    assert r is not None and r.status == 202
    await until(lambda: sup.records["alpha"].current is not first
                and body_of_state(sup, "alpha") == "running")
    one = body(await api.handle("GET", "/pipelines/alpha", {}))
    assert one["reloads"] == 1
    assert one["restarts"] == 0, "an asked-for restart is not a failure"
    assert one["last_error"] is None
    assert body(await api.handle("GET", "/pipelines/beta", {}))["reloads"] == 0


async def test_reload_through_the_api(bridge: Bridge) -> None:
    api = bridge.api()
    bridge.files["p.yaml"] = "pipelines: [\n"
    doc = assert_problem(await api.handle("POST", "/reload", AUTH), 422, "/reload")
    assert "p.yaml" in doc["detail"]
    assert set(bridge.supervisor.records) == {"alpha", "beta"}
    bridge.files["p.yaml"] = text("alpha", "beta", "gamma")
    r = await api.handle("POST", "/reload", AUTH)
    assert r is not None and r.status == 200, r.body
    assert body(r)["ok"] is True and body(r)["added"] == ["gamma"]
    listing = body(await api.handle("GET", "/pipelines", {}))
    assert [p["name"] for p in listing["pipelines"]] == ["alpha", "beta", "gamma"]
    assert listing["last_reload"]["ok"] is True
    pipeline_validator().validate(listing)


# ------------------------------------------------------------------------ OpenAPI


async def test_openapi_json_is_a_valid_openapi_3_1_document(bridge: Bridge) -> None:
    r = await bridge.api().handle("GET", "/openapi.json", {})
    assert r is not None and r.status == 200 and r.content_type == "application/json"
    doc = body(r)
    assert doc["openapi"].startswith("3.1")
    validate_openapi(doc)  # raises on an invalid document
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)  # raises on an invalid schema


async def test_every_pipelines_response_matches_the_openapi_schema(bridge: Bridge) -> None:
    api, sup = bridge.api(), bridge.supervisor
    validator = pipeline_validator()
    seen_states = set()

    def check(doc: Any) -> None:
        errors = sorted(validator.iter_errors(doc), key=str)
        assert errors == [], [e.message for e in errors]

    for step in range(4):
        if step == 1:
            await api.handle("POST", "/pipelines/alpha/pause", AUTH)
            await until(lambda: body_of_state(sup, "alpha") == "paused")
        if step == 2:
            sup.records["beta"].last_error = "fake failure for the schema"
            sup.records["beta"].last_error_at = 1_700_000_000.0
        if step == 3:
            await api.handle("POST", "/pipelines/alpha/resume", AUTH)
        bridge.history.take(sup)
        listing = body(await api.handle("GET", "/pipelines", {}))
        check(listing)
        for p in listing["pipelines"]:
            seen_states.add(p["state"])
            check(body(await api.handle("GET", f"/pipelines/{p['name']}", {})))
    assert {"running", "paused"} <= seen_states
    bad = dict(listing["pipelines"][0], state="sleeping")
    assert list(validator.iter_errors({"pipelines": [bad]})), "the schema accepts anything"


# ---------------------------------------------------------------- the page's HTML


class _Fields(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, dict[str, str]] = {}
        self.forms: list[dict[str, str | None]] = []
        self.buttons: list[dict[str, str | None]] = []
        self.inputs: list[dict[str, str | None]] = []
        self.labels_for: list[str] = []
        self._card = ""
        self._field: str | None = None
        self.tags: set[str] = set()
        self.lang: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "html":
            self.lang = a.get("lang")
        if tag == "section" and a.get("data-pipeline"):
            self._card = a["data-pipeline"] or ""
            self.fields[self._card] = {}
        if a.get("data-field"):
            self._field = a["data-field"]
            self.fields[self._card][self._field] = ""
        if tag == "form":
            self.forms.append(a)
        if tag == "button":
            self.buttons.append(a)
        if tag == "input":
            self.inputs.append(a)
        if tag == "label" and a.get("for"):
            self.labels_for.append(a["for"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._field = None

    def handle_data(self, data: str) -> None:
        if self._field is not None:
            self.fields[self._card][self._field] += data


def _num(s: str) -> float:
    return float(s.replace(",", ""))


async def test_the_page_shows_what_the_api_shows(bridge: Bridge) -> None:
    api, sup = bridge.api(), bridge.supervisor
    for name in ("alpha", "beta"):
        sup.pause(name)
    await until(lambda: all(body_of_state(sup, n) == "paused"
                            and sup.records[n].current is not None
                            and sup.records[n].current.window.messages == 0
                            for n in ("alpha", "beta")))
    page = await api.handle("GET", "/", {})
    listing = body(await api.handle("GET", "/pipelines", {}))
    assert page is not None and page.content_type == "text/html; charset=utf-8"
    parsed = _Fields()
    parsed.feed(page.body.decode())
    assert parsed.lang == "en"
    assert "script" not in parsed.tags
    assert list(parsed.fields) == ["alpha", "beta"]
    for p in listing["pipelines"]:
        shown = parsed.fields[p["name"]]
        assert set(PIPELINE_FIELDS) <= set(shown)
        assert shown["state"] == p["state"] == "paused"
        assert _num(shown["in_flight"]) == p["in_flight"]["messages"]
        assert _num(shown["max_in_flight"]) == p["in_flight"]["max_messages"]
        assert int(shown["restarts"]) == p["restarts"]
        assert _num(shown["written"]) == p["totals"]["written"] > 0
        assert _num(shown["lag"]) == p["lag"]
    # One form per pipeline; every input has a label; Restart posts elsewhere.
    assert [f["action"] for f in parsed.forms] == ["/pipelines/alpha/resume",
                                                   "/pipelines/beta/resume"]
    assert all(f["method"] == "post" for f in parsed.forms)
    assert sorted(i["id"] or "" for i in parsed.inputs) == sorted(parsed.labels_for)
    assert all(i["name"] == "token" and i["type"] == "password" for i in parsed.inputs)
    assert [b.get("formaction") for b in parsed.buttons] == [
        None, "/pipelines/alpha/restart", None, "/pipelines/beta/restart"]


async def test_the_page_escapes_what_it_shows(bridge: Bridge) -> None:
    bridge.supervisor.records["alpha"].last_error = '<img src=x onerror="alert(1)">'
    page = await bridge.api().handle("GET", "/", {})
    assert page is not None
    assert b"<img" not in page.body and b"&lt;img src=x" in page.body


def test_render_without_refresh() -> None:
    from connector.ops.page import render

    assert 'http-equiv="refresh"' in render([], mutable=False)
    still = render([], mutable=False, refresh=0)
    assert "refresh" not in still and "No pipelines." in still


# ------------------------------------------------------------- the HTTP layer


async def _exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split(" ")[1]), headers, rest


@pytest.fixture
async def server(bridge: Bridge) -> AsyncIterator[OpsServer]:
    s = OpsServer("127.0.0.1:0", bridge.supervisor.ready, bridge.api())
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_an_oversized_head_is_413(server: OpsServer) -> None:
    raw = (b"GET /pipelines HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD + 10)
           + b"\r\n\r\n")
    status, headers, rest = await _exchange(server.port, raw)
    assert status == 413
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(rest)["status"] == 413


async def test_a_body_over_64_kib_is_413(server: OpsServer, bridge: Bridge) -> None:
    assert MAX_BODY == 64 * 1024
    form = b"token=" + TOKEN.encode() + b"&pad=" + b"a" * MAX_BODY
    raw = (b"POST /pipelines/alpha/pause HTTP/1.1\r\nHost: x\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\n"
           b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n" + form)
    status, headers, rest = await _exchange(server.port, raw)
    assert status == 413
    assert json.loads(rest)["title"] == "Content Too Large"
    assert not bridge.supervisor.records["alpha"].paused
    # Just at the limit is fine (and a wrong token in a form is a 401 problem).
    form = b"token=wrong&pad=" + b"a" * (MAX_BODY - 16)
    raw = (b"POST /pipelines/alpha/pause HTTP/1.1\r\nHost: x\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\n"
           b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n" + form)
    status, headers, rest = await _exchange(server.port, raw)
    assert status == 401 and headers["content-type"] == "application/problem+json"


async def test_a_form_post_with_the_token_is_303_to_the_page(server: OpsServer,
                                                             bridge: Bridge) -> None:
    form = f"token={TOKEN}".encode()
    raw = (b"POST /pipelines/beta/pause HTTP/1.1\r\nHost: x\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\n"
           b"Content-Length: " + str(len(form)).encode() + b"\r\n\r\n" + form)
    status, headers, _ = await _exchange(server.port, raw)
    assert status == 303
    assert headers["location"] == "/"
    assert bridge.supervisor.records["beta"].paused
    # A JSON client with the bearer header gets the 202 document, not a redirect.
    raw = (f"POST /pipelines/beta/resume HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
           "\r\nContent-Length: 0\r\n\r\n").encode()
    status, headers, rest = await _exchange(server.port, raw)
    assert status == 202 and json.loads(rest)["action"] == "resume"
    status, headers, rest = await _exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["cache-control"] == "no-store"


def test_docs_openapi_is_valid_too() -> None:
    path = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    validate_openapi(json.loads(path.read_text()))
