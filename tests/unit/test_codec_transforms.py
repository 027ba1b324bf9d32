"""decode/encode as the engine drives them: subjects, the sync and async paths,
a registry that cannot be reached (a closed port, not a fake registry: the
registry itself is tested for real in tests/integration/test_codec_registry.py)."""

from __future__ import annotations

import inspect
import socket
from pathlib import Path

import orjson
import pytest
from natsconn_codec import wire
from natsconn_codec.transforms import Decode, Encode

from connector import Message, Rejected, RetryableError
from connector.engine.chain import TransformChain

from ._codec_helpers import ORDER_JSON, write_avsc, write_descriptor_set


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def avsc(tmp_path: Path) -> str:
    return write_avsc(tmp_path)


@pytest.mark.parametrize(("strategy", "subject", "expected"), [
    ("topic", "orders", "orders-value"),
    ("record", "orders", "shop.Order"),
    ("record", None, "shop.Order"),
    ("topic_record", "orders", "orders-shop.Order"),
])
def test_subject_strategies(avsc: str, strategy: str, subject: str | None,
                            expected: str) -> None:
    encode = Encode.make_test_instance(format="avro", schema_file=avsc, registry={
        "url": "http://127.0.0.1:1", "subject_strategy": strategy})
    assert encode.subject_of(Message(b"{}", subject)) == expected


def test_protobuf_record_strategy_uses_the_message_full_name(tmp_path: Path) -> None:
    encode = Encode.make_test_instance(
        format="protobuf", schema_file=write_descriptor_set(tmp_path), message="shop.v1.Item",
        registry={"url": "http://127.0.0.1:1", "subject_strategy": "topic_record"})
    assert encode.subject_of(Message(b"{}", "t")) == "t-shop.v1.Item"


def test_topic_strategy_rejects_a_message_without_a_subject(avsc: str) -> None:
    encode = Encode.make_test_instance(format="avro", schema_file=avsc,
                                       registry={"url": f"http://127.0.0.1:{closed_port()}"})
    out = encode.process([Message(orjson.dumps(ORDER_JSON), None)])
    assert isinstance(out, list), "nothing to look up: answered at once"
    [rejected] = out
    assert isinstance(rejected, Rejected)
    assert "names the registry subject after the message's subject" in rejected.reason


async def test_an_unreachable_registry_is_retryable_and_shows_no_password(avsc: str) -> None:
    url = f"http://natsconn:s3cret@127.0.0.1:{closed_port()}/apis/ccompat/v7"
    encode = Encode.make_test_instance(format="avro", schema_file=avsc, registry={
        "url": url, "timeout": "2s"})
    decode = Decode.make_test_instance(format="avro", registry={
        "url": url, "username": "u", "password": "hunter2", "timeout": "2s"})
    await encode.connect()
    await decode.connect()
    try:
        for transform, data in ((encode, orjson.dumps(ORDER_JSON)),
                                (decode, wire.header(1) + b"\x02")):
            pending = transform.process([Message(data, "orders")])
            assert inspect.isawaitable(pending), "a schema to fetch: the engine awaits it"
            with pytest.raises(RetryableError) as info:
                await pending
            text = str(info.value)
            assert "schema registry http://127.0.0.1:" in text
            assert "s3cret" not in text and "hunter2" not in text and "natsconn:" not in text
    finally:
        await encode.close()
        await decode.close()


async def test_messages_without_a_header_need_no_registry(avsc: str) -> None:
    """A batch of plain payloads is rejected at once: nothing to fetch."""
    decode = Decode.make_test_instance(format="avro",
                                       registry={"url": f"http://127.0.0.1:{closed_port()}"})
    out = decode.process([Message(b'{"plain": 1}'), Message(b"\x00\x00")])
    assert isinstance(out, list)
    reasons = [x.reason for x in out if isinstance(x, Rejected)]
    assert len(reasons) == 2
    assert "bad magic byte 0x7b" in reasons[0] and "shorter than the Confluent" in reasons[1]


async def test_the_engine_chain_runs_encode_then_decode(avsc: str) -> None:
    chain = TransformChain([
        Encode.make_test_instance(format="avro", schema_file=avsc),
        Decode.make_test_instance(format="avro", schema_file=avsc),
    ])
    await chain.connect()
    good = Message(orjson.dumps(ORDER_JSON), "orders", id="a")
    bad = Message(b'{"id": "x"}', "orders", id="b")
    messages, rejected = await chain.apply([good, bad])
    await chain.close()
    assert [orjson.loads(m.data) for m in messages] == [ORDER_JSON]
    assert [r.message.id for r in rejected] == ["b"]
    assert rejected[0].reason.startswith("JSON does not fit Avro schema shop.Order")


def test_descriptions_for_natsconn_plugins() -> None:
    assert Decode.description().startswith("Turns Avro, Protobuf or MessagePack payloads into")
    assert Encode.description().startswith("Turns JSON payloads into Avro, Protobuf")


