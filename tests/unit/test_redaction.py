"""The log Redactor: a secret never leaves in a formatted log line."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from connector.ops import logs


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("natsconn.pipeline.x", logging.WARNING, __file__, 1, message,
                            args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


@pytest.mark.parametrize("secret", [
    "plain-secret-4f2a",
    'with"quote\\and-backslash',
    "nön-äscii-sécret",
])
def test_json_and_console_lines_carry_no_secret(secret: str) -> None:
    logs.REDACTOR.add({secret})
    rec = record("connecting with %s", secret, password=secret, url=f"x {secret} y")
    line = logs.JsonFormatter().format(rec)
    assert secret not in line
    assert json.dumps(secret)[1:-1] not in line
    parsed = json.loads(line)
    assert parsed["msg"] == f"connecting with {logs.REDACTED}"
    assert parsed["password"] == logs.REDACTED
    assert parsed["url"] == f"x {logs.REDACTED} y"
    console = logs.ConsoleFormatter().format(rec)
    assert secret not in console
    assert f"connecting with {logs.REDACTED}" in console
    assert f"password={logs.REDACTED}" in console


def test_secret_in_a_traceback_is_redacted() -> None:
    secret = "trace-secret-91c3"
    logs.REDACTOR.add({secret})
    try:
        raise RuntimeError(f"auth failed for {secret}")
    except RuntimeError:
        rec = record("boom")
        rec.exc_info = sys.exc_info()
    assert secret not in logs.JsonFormatter().format(rec)
    assert secret not in logs.ConsoleFormatter().format(rec)


def test_url_password_is_redacted_even_when_unknown() -> None:
    line = logs.REDACTOR("connect to nats://bridge:unknown-pw-77@127.0.0.1:4222 failed")
    assert "unknown-pw-77" not in line
    assert "nats://bridge:***@127.0.0.1:4222" in line


def test_redactor_keeps_other_text() -> None:
    redactor = logs.Redactor()
    redactor.add({"abc-secret", "abc"})
    assert redactor("abc-secret and abc and ab") == "*** and *** and ab"
