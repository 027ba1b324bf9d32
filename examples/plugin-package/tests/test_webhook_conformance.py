"""The webhook sink runs natsconn's conformance kit, like any plugin package should."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from natsconn_webhook.sink import WebhookSink
from receiver import Receiver

from connector import Message
from connector.testing.kit import SinkSuite


class TestWebhookSink(SinkSuite):
    keeps_headers = True
    keeps_key = True
    max_message_bytes = 64 * 1024

    @pytest.fixture
    def server_address(self, receiver: Receiver) -> str:
        return receiver.address

    @pytest.fixture
    def make_sink(self, receiver: Receiver) -> Callable[..., WebhookSink]:
        def make(address: str | None = None) -> WebhookSink:
            return WebhookSink.make_test_instance(
                url=f"http://{address or receiver.address}/hook",
                max_body_bytes=self.max_message_bytes, timeout=2.0)
        return make

    @pytest.fixture
    def fetch(self, receiver: Receiver) -> Callable[[int, float], object]:
        async def fetch(count: int, timeout: float) -> list[Message]:
            try:
                return await receiver.wait_for(count, timeout)
            except TimeoutError:
                return list(receiver.messages)
        return fetch
