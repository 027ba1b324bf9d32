"""The ``webhook`` sink: POST each batch to an HTTP endpoint as JSON.

A batch is one request whose body is a JSON array of messages::

    [{"subject": "orders.eu", "key": null, "headers": {...}, "id": "ORDERS:42",
      "timestamp": 1764250000.0, "data": "<text>", "data_base64": null}, ...]

``data`` carries UTF-8 payloads as text; other payloads go in ``data_base64``.
The batch is written when the endpoint answers 2xx. 408, 429 and 5xx are
retryable (``Retry-After`` honoured); any other 4xx rejects the batch, which
then goes to the pipeline's dead-letter target.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import Field, HttpUrl, SecretStr

from connector import (
    ByteSize,
    Duration,
    Message,
    PartialWriteError,
    PluginConfig,
    RejectedError,
    RetryableError,
    Sink,
)

_RETRY_STATUS = {408, 425, 429}


class WebhookConfig(PluginConfig):
    url: HttpUrl = Field(description="endpoint receiving POST requests")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers")
    bearer_token: SecretStr | None = Field(None, description="sent as Authorization: Bearer")
    timeout: Duration = Field(10.0, description="per request")
    max_body_bytes: ByteSize = Field(4 * 1024 * 1024, description="a single message whose "
                                     "encoding exceeds this is rejected")
    ca_file: str | None = Field(None, description="CA bundle for https endpoints")


def encode(message: Message) -> dict[str, Any]:
    """One message as a JSON object; byte-exact for any payload."""
    try:
        text: str | None = message.data.decode("utf-8")
        raw = None
    except UnicodeDecodeError:
        text, raw = None, base64.b64encode(message.data).decode("ascii")
    return {
        "subject": message.subject,
        "key": message.key.decode("utf-8", "backslashreplace") if message.key else None,
        "headers": dict(message.headers),
        "id": message.id,
        "timestamp": message.timestamp,
        "data": text,
        "data_base64": raw,
    }


def decode(item: dict[str, Any]) -> Message:
    """The inverse of :func:`encode` (for receivers and tests)."""
    data = (item["data"].encode("utf-8") if item.get("data") is not None
            else base64.b64decode(item.get("data_base64") or ""))
    key = item.get("key")
    return Message(data, item.get("subject"), key.encode() if key is not None else None,
                   item.get("headers") or {}, item.get("timestamp"), item.get("id"))


class WebhookSink(Sink[WebhookConfig]):
    """POSTs batches as JSON arrays to an HTTP endpoint; 2xx means written."""

    Config = WebhookConfig

    async def connect(self) -> None:
        cfg = self.config
        headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.bearer_token is not None:
            headers["Authorization"] = f"Bearer {cfg.bearer_token.get_secret_value()}"
        self._client = httpx.AsyncClient(
            timeout=cfg.timeout, headers=headers, verify=cfg.ca_file or True)

    async def write_batch(self, messages: Sequence[Message]) -> None:
        items: list[dict[str, Any]] = []
        rejected: dict[int, RetryableError | RejectedError] = {}
        kept: list[int] = []
        for i, m in enumerate(messages):
            item = encode(m)
            if len(json.dumps(item)) > self.config.max_body_bytes:
                rejected[i] = RejectedError(
                    f"message encodes to more than max_body_bytes={self.config.max_body_bytes}")
                continue
            items.append(item)
            kept.append(i)
        if items:
            try:
                await self._post(items)
            except (RetryableError, RejectedError) as exc:
                if not rejected:
                    raise
                rejected.update(dict.fromkeys(kept, exc))
        if rejected:
            raise PartialWriteError(rejected)

    async def _post(self, items: list[dict[str, Any]]) -> None:
        try:
            response = await self._client.post(str(self.config.url), content=json.dumps(items))
        except httpx.HTTPError as exc:
            raise RetryableError(f"webhook: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        if status >= 500 or status in _RETRY_STATUS:
            after = response.headers.get("Retry-After")
            raise RetryableError(
                f"webhook answered {status}",
                retry_after=float(after) if after and after.isdigit() else None)
        raise RejectedError(f"webhook answered {status}: {response.text[:200]}")

    async def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            await client.aclose()
