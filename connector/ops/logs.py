"""Structured logs (JSON or console) with secrets redacted from every line."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable

REDACTED = "***"
_URL_PASSWORD = re.compile(r"://([^/@:\s]*):[^/@\s]+@")
_URL_TOKEN = re.compile(r"://[^/@:\s]+@")  # nats://TOKEN@host: a bare token


class Redactor:
    """Replaces every known secret value in a text. Secrets are registered as the
    config is loaded (SecretStr fields, values read with ``${file:...}``)."""

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def add(self, secrets: Iterable[str]) -> None:
        # Each secret also as JSON writes it (quotes, backslashes, non-ASCII escaped).
        merged = set(self._secrets) | {
            v for s in secrets if len(s) >= 3 for v in (s, json.dumps(s)[1:-1])
        }
        self._secrets = sorted(merged, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "@" in text:  # a password inside any URL, known or not
            text = _URL_PASSWORD.sub(rf"://\1:{REDACTED}@", text)
            text = _URL_TOKEN.sub(f"://{REDACTED}@", text)
        return text


REDACTOR = Redactor()

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return REDACTOR(json.dumps(out, default=str))


class ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = {
            k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")
        }
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return REDACTOR(text)


class _QuietAsyncio(logging.Filter):
    """asyncio warns on every TLS close that 'returning true from eof_received()
    has no effect when using ssl' (a remark about the client library, not an
    event an operator can act on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


def configure(fmt: str = "console", level: str = "info") -> None:
    logging.getLogger("asyncio").addFilter(_QuietAsyncio())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("natsconn").setLevel(level.upper())
    logging.getLogger("natsconn_plugins").setLevel(level.upper())
