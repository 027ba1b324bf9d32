"""What the webhook sink promises beyond the kit: status codes and a real pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from natsconn_webhook.sink import WebhookSink, decode, encode
from receiver import Receiver

from connector import Message, PartialWriteError, RejectedError, RetryableError


def test_encoding_round_trips_any_payload() -> None:
    for data in (b"", b"plain text", b"\xff\xfe\x00binary", "ünïcode".encode()):
        m = Message(data, "a.b", b"k", {"H": "v"}, 1.5, "S:1")
        assert decode(encode(m)) == m


async def test_5xx_is_retryable_with_retry_after(receiver: Receiver) -> None:
    sink = WebhookSink.make_test_instance(url=f"http://{receiver.address}/hook")
    await sink.connect()
    receiver.fail_with = [503]
    with pytest.raises(RetryableError):
        await sink.write_batch([Message(b"x")])
    await sink.write_batch([Message(b"x")])
    assert [m.data for m in receiver.messages] == [b"x"]
    await sink.close()


async def test_4xx_rejects_the_batch(receiver: Receiver) -> None:
    sink = WebhookSink.make_test_instance(url=f"http://{receiver.address}/hook")
    await sink.connect()
    receiver.fail_with = [422]
    with pytest.raises(RejectedError, match="422"):
        await sink.write_batch([Message(b"x")])
    await sink.close()


async def test_oversized_message_is_rejected_alone(receiver: Receiver) -> None:
    sink = WebhookSink.make_test_instance(url=f"http://{receiver.address}/hook",
                                          max_body_bytes=1000)
    await sink.connect()
    with pytest.raises(PartialWriteError) as info:
        await sink.write_batch([Message(b"a"), Message(b"b" * 5000), Message(b"c")])
    assert list(info.value.failed) == [1]
    assert isinstance(info.value.failed[1], RejectedError)
    assert [m.data for m in receiver.messages] == [b"a", b"c"]
    await sink.close()


async def test_natsconn_run_delivers_through_the_installed_plugin(
    receiver: Receiver, tmp_path: Path
) -> None:
    """The package is found through its entry point by the natsconn command itself."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"""
pipelines:
  - name: to-webhook
    source: {{type: generate, count: 5000, size: 64}}
    sink: {{type: webhook, url: "http://{receiver.address}/hook"}}
    batch: {{max_messages: 500}}
http: {{enabled: false}}
""")
    natsconn = Path(sys.executable).with_name("natsconn")
    proc = await __import__("asyncio").create_subprocess_exec(
        str(natsconn), "run", str(pipeline), stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    got = sorted(int(m.data[:12]) for m in receiver.messages)
    assert got == list(range(5000))
