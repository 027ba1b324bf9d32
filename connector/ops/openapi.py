"""The admin API described as OpenAPI 3.1 (served at /openapi.json, kept in docs/)."""

from __future__ import annotations

from typing import Any

from .. import __version__

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": _PROBLEM}}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "the pipeline's name"}
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]


def _action(verb: str, summary: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "operationId": f"{verb}Pipeline", "parameters": [_NAME],
        "security": _AUTH,
        "responses": {
            "202": _ok("accepted", {"$ref": "#/components/schemas/Accepted"}),
            "401": _problem("no or a wrong bearer token"),
            "403": _problem("read-only: no admin token is configured"),
            "404": _problem("no such pipeline"),
        },
    }}


def document() -> dict[str, Any]:
    number = {"type": "number"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "natsconn admin API", "version": __version__,
                 "description": "Read the pipelines of a running natsconn; pause, resume, "
                 "restart them; reload the pipeline file. Reads are open unless "
                 "http.read_token_required; mutations need a bearer token."},
        "paths": {
            "/pipelines": {"get": {
                "summary": "every pipeline's state, rates, in flight, lag, errors",
                "operationId": "listPipelines",
                "responses": {"200": _ok("the pipelines", {
                    "type": "object", "required": ["pipelines"],
                    "properties": {
                        "pipelines": {"type": "array",
                                      "items": {"$ref": "#/components/schemas/Pipeline"}},
                        "last_reload": {"$ref": "#/components/schemas/Reload"}}})},
            }},
            "/pipelines/{name}": {"get": {
                "summary": "one pipeline, with its effective configuration (secrets hidden)",
                "operationId": "getPipeline", "parameters": [_NAME],
                "responses": {"200": _ok("the pipeline", {
                    "allOf": [{"$ref": "#/components/schemas/Pipeline"},
                              {"type": "object", "properties": {"config": {
                                  "type": "object",
                                  "description": "the effective config, secrets as ***"}}}]}),
                    "404": _problem("no such pipeline")},
            }},
            "/pipelines/{name}/pause": _action(
                "pause", "stop reading; in-flight work finishes, nothing is redelivered"),
            "/pipelines/{name}/resume": _action("resume", "read again"),
            "/pipelines/{name}/restart": _action(
                "restart", "drain within the shutdown timeout and start again"),
            "/reload": {"post": {
                "summary": "validate the pipeline file and apply what changed",
                "operationId": "reload", "security": _AUTH,
                "responses": {
                    "200": _ok("applied", {"$ref": "#/components/schemas/Reload"}),
                    "401": _problem("no or a wrong bearer token"),
                    "403": _problem("read-only: no admin token is configured"),
                    "422": _problem("the file is invalid; nothing changed (detail has "
                                    "file:line)"),
                },
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {"type": "object", "description": "RFC 9457 problem details",
                            "required": ["type", "title", "status", "detail"],
                            "properties": {"type": {"type": "string"},
                                           "title": {"type": "string"},
                                           "status": {"type": "integer"},
                                           "detail": {"type": "string"},
                                           "instance": {"type": "string"}}},
                "Accepted": {"type": "object", "required": ["name", "action", "accepted"],
                             "properties": {"name": {"type": "string"},
                                            "action": {"enum": ["pause", "resume", "restart"]},
                                            "accepted": {"type": "boolean"}}},
                "Reload": {"type": "object", "required": ["ok", "at"], "properties": {
                    "ok": {"type": "boolean"}, "at": {"type": "string", "format": "date-time"},
                    "error": {"type": "string"},
                    "unchanged": {"type": "array", "items": {"type": "string"}},
                    "changed": {"type": "array", "items": {"type": "string"}},
                    "removed": {"type": "array", "items": {"type": "string"}},
                    "added": {"type": "array", "items": {"type": "string"}},
                    "restart_needed_for": {"type": "array", "items": {"type": "string"}}}},
                "Pipeline": {"type": "object", "required": [
                    "name", "state", "connected", "paused", "rates", "in_flight", "lag",
                    "restarts", "last_error"], "properties": {
                    "name": {"type": "string"},
                    "state": {"enum": ["starting", "running", "paused", "draining", "finished",
                                       "failed", "stopped"]},
                    "connected": {"type": "boolean"},
                    "paused": {"type": "boolean"},
                    "source": {"type": "object", "properties": {"type": {"type": "string"}}},
                    "sinks": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "type": {"type": "string"},
                        "when": {"type": ["string", "null"]}, "written": number,
                        "queued": number, "dead_lettered": number}}},
                    "rates": {"type": "object", "properties": {
                        "read_per_second": number, "written_per_second": number}},
                    "in_flight": {"type": "object", "properties": {
                        "messages": number, "max_messages": number, "bytes": number,
                        "max_bytes": number}},
                    "lag": {**number, "description": "messages waiting at the source, where "
                            "the source knows (0 otherwise)"},
                    "totals": {"type": "object", "properties": {
                        k: number for k in ("read", "written", "dead_lettered", "filtered",
                                            "retries")}},
                    "restarts": {"type": "integer", "description": "after failures"},
                    "reloads": {"type": "integer",
                                "description": "restarts asked for (API, changed config)"},
                    "last_error": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
                        "message": {"type": "string"},
                        "at": {"type": "string", "format": "date-time"}}}]},
                    "history": {"type": "array", "description": "[unix time, read/s, "
                                "written/s] every 2 s over the last 5 minutes",
                                "items": {"type": "array", "items": number}},
                }},
            },
        },
    }
