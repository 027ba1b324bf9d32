"""decode/encode against a real schema registry (Apicurio Registry's Confluent
API, started by ``scripts/services start registry``; ``NATSCONN_REGISTRY_URL``).

Register and fetch by id, the subject strategies, auto_register on and off,
the latest version and its cache_ttl, an incompatible schema refused with the
registry's own reason, an unknown id, each id fetched once under concurrency;
and the issue's flow: JSON → Avro through the registry → Kafka → decode back →
JetStream, 100,000 messages equal field by field, with the misfits
dead-lettered with the codec's reason.

The registry keeps its schemas in memory and is shared by every run, so each
test uses subjects and record names carrying ``unique``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client as NATS
from natsconn_codec import wire
from natsconn_codec.registry import RegistryClient, RegistryConfig
from natsconn_codec.transforms import Decode, Encode

from connector import Message, Rejected, RejectedError
from tests.unit._codec_helpers import (
    ORDER_AVSC,
    ORDER_JSON,
    PROTO_ORDER_JSON,
    write_avsc,
    write_descriptor_set,
)

from .helpers import (
    create_stream,
    pipeline_file,
    publish_js,
    read_stream,
    run_in_process,
    wait_ready_in_process,
    wait_stream_count,
)
from .kafka.kafka_helpers import create_topic

pytestmark = pytest.mark.integration

DEFAULT_URL = "http://127.0.0.1:8081/apis/ccompat/v7"
CT = {"Content-Type": "application/vnd.schemaregistry.v1+json"}


@pytest.fixture
def registry_url() -> str:
    """NATSCONN_REGISTRY_URL, checked reachable: a registry that does not answer
    fails the test with the command that starts it (never a skip)."""
    url = os.environ.get("NATSCONN_REGISTRY_URL", DEFAULT_URL)
    try:
        httpx.get(f"{url}/subjects", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"no schema registry at {url} ({exc}): run `scripts/services start "
                    "registry` and `eval \"$(scripts/services env)\"`", pytrace=False)
    return url


@pytest.fixture
async def raw(registry_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The registry's own API, for what a test checks or sets beside natsconn."""
    async with httpx.AsyncClient(base_url=registry_url, headers=CT, timeout=10) as client:
        yield client


def schema_for(unique: str, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """ORDER_AVSC in a namespace of this test's own, so record-named subjects are too."""
    return dict(ORDER_AVSC, namespace=f"t{unique}",
                fields=fields if fields is not None else ORDER_AVSC["fields"])


async def started(*transforms: Encode | Decode) -> None:
    for t in transforms:
        await t.connect()


async def closed(*transforms: Encode | Decode) -> None:
    for t in transforms:
        await t.close()


async def run(transform: Encode | Decode, messages: list[Message]) -> list[Message | Rejected]:
    out: Any = transform.process(messages)
    if inspect.isawaitable(out):
        out = await out
    return list(out)


async def test_register_then_decode_by_id(registry_url: str, raw: httpx.AsyncClient,
                                          unique: str, tmp_path: Path) -> None:
    path = write_avsc(tmp_path, schema_for(unique))
    topic = f"orders-{unique}"
    encode = Encode.make_test_instance(format="avro", schema_file=path, registry={
        "url": registry_url, "auto_register": True})
    decode = Decode.make_test_instance(format="avro", registry={"url": registry_url})
    await started(encode, decode)
    try:
        [out] = await run(encode, [Message(orjson.dumps(ORDER_JSON), topic, id="m1")])
        assert isinstance(out, Message)
        schema_id, _ = wire.split(out.data)
        latest = (await raw.get(f"/subjects/{topic}-value/versions/latest")).json()
        assert latest["id"] == schema_id
        by_id = (await raw.get(f"/schemas/ids/{schema_id}")).json()
        assert json.loads(by_id["schema"])["name"] == "Order"

        [back] = await run(decode, [out])
        assert isinstance(back, Message) and back.id == "m1"
        value = orjson.loads(back.data)
        for name, expected in ORDER_JSON.items():
            assert value[name] == expected, name

        # cached now: the next batch is answered without awaiting the registry
        for transform, batch in ((encode, [Message(orjson.dumps(ORDER_JSON), topic)]),
                                 (decode, [out])):
            assert isinstance(transform.process(batch), list)
        assert encode.registry is not None and decode.registry is not None
        assert (encode.registry.requests, decode.registry.requests) == (1, 1)
    finally:
        await closed(encode, decode)


async def test_each_id_is_fetched_once_under_concurrency(registry_url: str, unique: str,
                                                         tmp_path: Path) -> None:
    path = write_avsc(tmp_path, schema_for(unique))
    encode = Encode.make_test_instance(format="avro", schema_file=path, registry={
        "url": registry_url, "auto_register": True})
    await started(encode)
    [framed] = await run(encode, [Message(orjson.dumps(ORDER_JSON), f"conc-{unique}")])
    await closed(encode)
    assert isinstance(framed, Message)
    decode = Decode.make_test_instance(format="avro", registry={"url": registry_url})
    await started(decode)
    try:
        pending = [decode.process([framed] * 10) for _ in range(20)]
        assert all(inspect.isawaitable(p) for p in pending)
        results = await asyncio.gather(*pending)  # type: ignore[arg-type]
        assert all(isinstance(m, Message) for batch in results for m in batch)
        assert decode.registry is not None and decode.registry.requests == 1
    finally:
        await closed(decode)


@pytest.mark.parametrize(("strategy", "subject"), [
    ("topic", "{topic}-value"),
    ("record", "t{unique}.Order"),
    ("topic_record", "{topic}-t{unique}.Order"),
])
async def test_subject_strategies(registry_url: str, raw: httpx.AsyncClient, unique: str,
                                  tmp_path: Path, strategy: str, subject: str) -> None:
    topic = f"strat-{unique}"
    expected = subject.format(topic=topic, unique=unique)
    path = write_avsc(tmp_path, schema_for(unique))
    encode = Encode.make_test_instance(format="avro", schema_file=path, registry={
        "url": registry_url, "auto_register": True, "subject_strategy": strategy})
    await started(encode)
    try:
        [out] = await run(encode, [Message(orjson.dumps(ORDER_JSON), topic)])
    finally:
        await closed(encode)
    assert isinstance(out, Message)
    subjects = (await raw.get("/subjects")).json()
    assert expected in subjects
    latest = (await raw.get(f"/subjects/{expected}/versions/latest")).json()
    assert latest["id"] == wire.split(out.data)[0]


async def test_without_auto_register_the_schema_must_be_there(
        registry_url: str, raw: httpx.AsyncClient, unique: str, tmp_path: Path) -> None:
    schema = schema_for(unique)
    path = write_avsc(tmp_path, schema)
    topic = f"noauto-{unique}"
    encode = Encode.make_test_instance(format="avro", schema_file=path,
                                       registry={"url": registry_url})
    await started(encode)
    try:
        batch = [Message(orjson.dumps(ORDER_JSON), topic)]
        [refused] = await run(encode, batch)
        assert isinstance(refused, Rejected)
        assert f"the schema is not registered under subject '{topic}-value'" in refused.reason
        assert "auto_register is off" in refused.reason
        # registered by someone else: the next batch finds it (the refusal is not kept)
        answer = await raw.post(f"/subjects/{topic}-value/versions",
                                json={"schema": json.dumps(schema)})
        [out] = await run(encode, batch)
        assert isinstance(out, Message)
        assert wire.split(out.data)[0] == answer.json()["id"]
    finally:
        await closed(encode)


async def test_latest_version_and_its_cache_ttl(registry_url: str, raw: httpx.AsyncClient,
                                                unique: str) -> None:
    """encode without schema_file writes with the subject's latest version."""
    topic = f"latest-{unique}"
    v1 = schema_for(unique)
    v2 = schema_for(unique, [*ORDER_AVSC["fields"],
                             {"name": "channel", "type": "string", "default": "web"}])
    encode = Encode.make_test_instance(format="avro", registry={
        "url": registry_url, "cache_ttl": "300ms"})
    decode = Decode.make_test_instance(format="avro", registry={"url": registry_url})
    await started(encode, decode)
    try:
        batch = [Message(orjson.dumps(dict(ORDER_JSON, channel="app")), topic)]
        [missing] = await run(encode, batch)
        assert isinstance(missing, Rejected)
        assert f"no schema is registered under subject '{topic}-value'" in missing.reason
        id1 = (await raw.post(f"/subjects/{topic}-value/versions",
                              json={"schema": json.dumps(v1)})).json()["id"]
        [out1] = await run(encode, batch)
        assert isinstance(out1, Message) and wire.split(out1.data)[0] == id1
        id2 = (await raw.post(f"/subjects/{topic}-value/versions",
                              json={"schema": json.dumps(v2)})).json()["id"]
        assert id2 != id1
        [still] = await run(encode, batch)  # within cache_ttl: still v1
        assert isinstance(still, Message) and wire.split(still.data)[0] == id1
        await asyncio.sleep(0.4)
        [out2] = await run(encode, batch)
        assert isinstance(out2, Message) and wire.split(out2.data)[0] == id2
        decoded = await run(decode, [out1, out2])
        values = [orjson.loads(m.data) for m in decoded if isinstance(m, Message)]
        assert "channel" not in values[0] and values[1]["channel"] == "app"
    finally:
        await closed(encode, decode)


async def test_an_incompatible_schema_is_refused_with_the_registrys_reason(
        registry_url: str, raw: httpx.AsyncClient, unique: str, tmp_path: Path) -> None:
    topic = f"compat-{unique}"
    v1 = write_avsc(tmp_path, schema_for(unique), "v1.avsc")
    # a new field without a default: not BACKWARD compatible
    v2 = write_avsc(tmp_path, schema_for(unique, [*ORDER_AVSC["fields"],
                                                  {"name": "channel", "type": "string"}]),
                    "v2.avsc")
    first = Encode.make_test_instance(format="avro", schema_file=v1, registry={
        "url": registry_url, "auto_register": True})
    second = Encode.make_test_instance(format="avro", schema_file=v2, registry={
        "url": registry_url, "auto_register": True})
    await started(first, second)
    try:
        [ok] = await run(first, [Message(orjson.dumps(ORDER_JSON), topic)])
        assert isinstance(ok, Message)
        answer = await raw.put(f"/config/{topic}-value", json={"compatibility": "BACKWARD"})
        assert answer.status_code == 200, answer.text
        good = Message(orjson.dumps(dict(ORDER_JSON, channel="web")), topic, id="a")
        [refused] = await run(second, [good])
        assert isinstance(refused, Rejected)
        assert refused.reason.startswith(
            f"schema registry refused the schema for subject '{topic}-value': "), refused.reason
        assert "Incompatible" in refused.reason and "(HTTP 409" in refused.reason
    finally:
        await closed(first, second)


async def test_an_invalid_schema_is_refused_with_the_registrys_reason(
        registry_url: str, unique: str) -> None:
    client = RegistryClient(RegistryConfig(url=registry_url))
    await client.connect()
    try:
        with pytest.raises(RejectedError) as info:
            await client.id_for(f"invalid-{unique}-value", '{"type": "recor"}', "AVRO",
                                register=True)
    finally:
        await client.close()
    assert "(HTTP 422, error code 42201)" in str(info.value), info.value


async def test_unknown_id_and_wrong_schema_type_are_rejected_the_rest_flows(
        registry_url: str, unique: str, tmp_path: Path) -> None:
    pb = write_descriptor_set(tmp_path, package=f"t{unique}")
    encode_pb = Encode.make_test_instance(
        format="protobuf", schema_file=pb, message=f"t{unique}.Order",
        registry={"url": registry_url, "auto_register": True})
    encode_avro = Encode.make_test_instance(
        format="avro", schema_file=write_avsc(tmp_path, schema_for(unique)),
        registry={"url": registry_url, "auto_register": True})
    decode = Decode.make_test_instance(format="avro", registry={"url": registry_url})
    await started(encode_pb, encode_avro, decode)
    try:
        [proto] = await run(encode_pb, [Message(orjson.dumps(PROTO_ORDER_JSON), f"pb-{unique}")])
        [avro] = await run(encode_avro, [Message(orjson.dumps(ORDER_JSON), f"av-{unique}")])
        assert isinstance(proto, Message) and isinstance(avro, Message)
        unknown = Message(wire.header(2**31 - 7) + avro.data[5:], id="unknown")
        out = await run(decode, [unknown, Message(proto.data, id="proto"), avro])
        assert isinstance(out[0], Rejected)
        assert out[0].reason == f"unknown schema id {2**31 - 7}: the registry has no such schema"
        assert isinstance(out[1], Rejected)
        assert out[1].reason == (f"schema id {wire.split(proto.data)[0]} is a PROTOBUF schema; "
                                 "this decode reads AVRO")
        assert isinstance(out[2], Message) and orjson.loads(out[2].data) == ORDER_JSON
        # the unknown id is remembered for cache_ttl: no second request for it
        assert decode.registry is not None
        before = decode.registry.requests
        [again] = await run(decode, [unknown])
        assert isinstance(again, Rejected) and decode.registry.requests == before
    finally:
        await closed(encode_pb, encode_avro, decode)


async def test_protobuf_through_the_registry(registry_url: str, raw: httpx.AsyncClient,
                                             unique: str, tmp_path: Path) -> None:
    pb = write_descriptor_set(tmp_path, package=f"t{unique}")
    order = Encode.make_test_instance(format="protobuf", schema_file=pb,
                                      message=f"t{unique}.Order",
                                      registry={"url": registry_url, "auto_register": True})
    item = Encode.make_test_instance(format="protobuf", schema_file=pb,
                                     message=f"t{unique}.Item",
                                     registry={"url": registry_url, "auto_register": True,
                                               "subject_strategy": "record"})
    decode = Decode.make_test_instance(format="protobuf", schema_file=pb,
                                       message=f"t{unique}.Order",
                                       registry={"url": registry_url})
    await started(order, item, decode)
    try:
        [o] = await run(order, [Message(orjson.dumps(PROTO_ORDER_JSON), f"pbo-{unique}")])
        [i] = await run(item, [Message(b'{"sku": "A", "count": "3"}', "x")])
        assert isinstance(o, Message) and isinstance(i, Message)
        assert o.data[5] == 0, "the index path [0] is one zero byte"
        assert i.data[5:7] == b"\x02\x02", "Item is message 1 of the file"
        by_id = (await raw.get(f"/schemas/ids/{wire.split(o.data)[0]}")).json()
        assert by_id.get("schemaType") == "PROTOBUF"
        assert f"t{unique}.Item" in (await raw.get("/subjects")).json()
        back = await run(decode, [o, i])
        values = [orjson.loads(m.data) for m in back if isinstance(m, Message)]
        for name, expected in PROTO_ORDER_JSON.items():
            assert values[0][name] == expected, name
        assert values[1] == {"sku": "A", "count": "3"}
    finally:
        await closed(order, item, decode)


# ---------------------------------------------------------------- the flow

N = 100_000
BAD_EVERY = 10_000  # these do not fit the schema: dead-lettered with the codec's reason


def order_json(seq: int) -> bytes:
    if seq % BAD_EVERY == 5:
        return orjson.dumps(dict(ORDER_JSON, id=seq, qty="many"))
    return orjson.dumps(dict(ORDER_JSON, id=seq, qty=seq % 1000, customer=f"c-{seq % 97}",
                             score=seq / 4, note=None if seq % 2 else f"n{seq}"))


async def test_json_avro_registry_kafka_and_back_field_by_field(
        nc: NATS, nats_url: str, kafka_bootstrap: str, registry_url: str, unique: str,
        tmp_path: Path) -> None:
    path = write_avsc(tmp_path, schema_for(unique))
    topic = f"codec-{unique}"
    await create_topic(kafka_bootstrap, topic, partitions=3)
    await create_stream(nc, f"CODEC_IN_{unique}", [f"codecin.{unique}.>"])
    await publish_js(nc, f"codecin.{unique}.orders", N, data=order_json)
    flow: dict[str, Any] = {"batch": {"max_messages": 1000, "max_wait": "20ms"}}
    registry = {"url": registry_url}
    file = pipeline_file(tmp_path, [
        {
            "name": f"codec-to-kafka-{unique}",
            "source": {"type": "jetstream", "servers": [nats_url],
                       "stream": f"CODEC_IN_{unique}", "durable": f"codec-{unique}"},
            "transforms": [
                {"type": "map_subject", "subject": topic},  # subject = topic-value
                {"type": "encode", "format": "avro", "schema_file": path,
                 "registry": dict(registry, auto_register=True)},
            ],
            "sink": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap], "topic": topic},
            "dead_letter": {"type": "jetstream", "servers": [nats_url],
                            "subject": f"codecdlq.{unique}", "stream": f"CODEC_DLQ_{unique}",
                            "stream_subjects": [f"codecdlq.{unique}"]},
            **flow,
        },
        {
            "name": f"codec-from-kafka-{unique}",
            "source": {"type": "kafka", "bootstrap_servers": [kafka_bootstrap],
                       "topics": [topic]},
            "transforms": [{"type": "decode", "format": "avro", "registry": registry}],
            "sink": {"type": "jetstream", "servers": [nats_url],
                     "subject": f"codecout.{unique}", "stream": f"CODEC_OUT_{unique}",
                     "stream_subjects": [f"codecout.{unique}"]},
            **flow,
        },
    ])
    bad = N // BAD_EVERY
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await wait_stream_count(nc, f"CODEC_OUT_{unique}", N - bad, timeout=240)
        await wait_stream_count(nc, f"CODEC_DLQ_{unique}", bad, timeout=30)

    out = await read_stream(nc, f"CODEC_OUT_{unique}", timeout=120)
    seen: dict[int, dict[str, Any]] = {}
    for m in out:
        value = orjson.loads(m.data)
        seen.setdefault(value["id"], value)
    expected_ids = {s for s in range(N) if s % BAD_EVERY != 5}
    assert set(seen) == expected_ids, (
        f"missing {len(expected_ids - set(seen))}, unexpected {len(set(seen) - expected_ids)}")
    duplicates = len(out) - len(seen)  # Kafka is at least once; none expected in a clean run
    assert duplicates == 0, f"{duplicates} duplicate(s)"
    for seq, value in seen.items():
        original = orjson.loads(order_json(seq))
        assert value == original, f"message {seq}: {value} != {original}"

    dlq = await read_stream(nc, f"CODEC_DLQ_{unique}")
    assert sorted(orjson.loads(m.data)["id"] for m in dlq) == [
        s for s in range(N) if s % BAD_EVERY == 5]
    for m in dlq:
        reason = (m.headers or {}).get("Natsconn-Error", "")
        assert reason == (f"JSON does not fit Avro schema t{unique}.Order: field "
                          f"t{unique}.Order.qty: expected int, found 'many' (str)"), reason


async def test_schema_references_are_resolved(registry_url: str, raw: httpx.AsyncClient,
                                              unique: str) -> None:
    """An Avro schema naming a type registered under another subject (Confluent
    ``references``): encode by the latest version and decode by id both resolve it."""
    ns = f"t{unique}"
    address = {"type": "record", "name": "Address", "namespace": ns,
               "fields": [{"name": "city", "type": "string"}]}
    answer = await raw.post(f"/subjects/addr-{unique}/versions",
                            json={"schema": json.dumps(address)})
    assert answer.status_code == 200, answer.text
    order = {"type": "record", "name": "Shipment", "namespace": ns,
             "fields": [{"name": "id", "type": "long"},
                        {"name": "to", "type": f"{ns}.Address"}]}
    topic = f"refs-{unique}"
    answer = await raw.post(f"/subjects/{topic}-value/versions", json={
        "schema": json.dumps(order),
        "references": [{"name": f"{ns}.Address", "subject": f"addr-{unique}", "version": 1}]})
    assert answer.status_code == 200, answer.text
    encode = Encode.make_test_instance(format="avro", registry={"url": registry_url})
    decode = Decode.make_test_instance(format="avro", registry={"url": registry_url})
    await started(encode, decode)
    try:
        value = {"id": 5, "to": {"city": "Lyon"}}
        [out] = await run(encode, [Message(orjson.dumps(value), topic)])
        assert isinstance(out, Message), out
        assert wire.split(out.data)[0] == answer.json()["id"]
        [back] = await run(decode, [out])
        assert isinstance(back, Message) and orjson.loads(back.data) == value
    finally:
        await closed(encode, decode)


async def test_decode_resolves_the_writer_schema_to_a_reader_schema(
        registry_url: str, unique: str, tmp_path: Path) -> None:
    """decode with registry and schema_file: Avro schema evolution, the registry's
    writer schema read as the file's reader schema."""
    writer = schema_for(unique, [*ORDER_AVSC["fields"],
                                 {"name": "channel", "type": "string", "default": "web"}])
    reader = schema_for(unique, [f for f in ORDER_AVSC["fields"] if f["name"] != "note"]
                        + [{"name": "region", "type": "string", "default": "eu"}])
    encode = Encode.make_test_instance(
        format="avro", schema_file=write_avsc(tmp_path, writer, "writer.avsc"),
        registry={"url": registry_url, "auto_register": True})
    decode = Decode.make_test_instance(
        format="avro", schema_file=write_avsc(tmp_path, reader, "reader.avsc"),
        registry={"url": registry_url})
    await started(encode, decode)
    try:
        [out] = await run(encode, [Message(orjson.dumps(dict(ORDER_JSON, channel="app")),
                                           f"evolve-{unique}")])
        assert isinstance(out, Message)
        [back] = await run(decode, [out])
        assert isinstance(back, Message), back
        value = orjson.loads(back.data)
        expected = {k: v for k, v in ORDER_JSON.items() if k != "note"}
        assert value == dict(expected, region="eu")
    finally:
        await closed(encode, decode)
