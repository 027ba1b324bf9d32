"""decode/encode options: what is refused at load time, with file, line and a clear message."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from natsconn_codec.transforms import Decode, Encode

from connector import ConfigError
from connector.config import load_text

from ._codec_helpers import write_avsc, write_descriptor_set

REG = "{url: 'http://127.0.0.1:1/apis/ccompat/v7'}"


def pipeline(transform: str) -> str:
    return textwrap.dedent(f"""\
        pipelines:
          - name: codec
            source: {{type: generate, count: 1}}
            transforms:
              - {transform}
            sink: {{type: drop}}
        """)


def error(transform: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(pipeline(transform), "pipeline.yaml", env={})
    assert info.value.file == "pipeline.yaml"
    assert info.value.line == 5, info.value
    return info.value


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    bad_json = tmp_path / "bad.avsc"
    bad_json.write_text('{"type": "record",\n "name": }')
    bad_type = tmp_path / "badtype.avsc"
    bad_type.write_text('{"type": "record", "name": "R", "fields": [{"name": "a", '
                        '"type": "strin"}]}')
    not_fds = tmp_path / "order.proto"
    not_fds.write_text('syntax = "proto3";\nmessage Order { int64 id = 1; }\n')
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    return {"avsc": write_avsc(tmp_path), "pb": write_descriptor_set(tmp_path),
            "bad_json": str(bad_json), "bad_type": str(bad_type), "proto": str(not_fds),
            "empty": str(empty), "missing": str(tmp_path / "nope.avsc"),
            "unnamed": write_avsc(tmp_path, {"type": "array", "items": "long"}, "arr.avsc")}


@pytest.mark.parametrize(("transform", "message"), [
    ("{type: decode, format: avro}",
     "format avro needs schema_file (a .avsc) or registry to take the schema from, found "
     "neither"),
    ("{type: decode, format: avro, schema_file: '{missing}'}",
     "expected an Avro schema file (.avsc) at '{missing}', found no such file"),
    ("{type: decode, format: avro, schema_file: '{bad_json}'}",
     "expected an Avro schema (JSON) in '{bad_json}', found invalid JSON at line 2 column 10"),
    ("{type: encode, format: avro, schema_file: '{bad_type}'}",
     "expected a valid Avro schema in '{bad_type}', found: UnknownType: strin"),
    ("{type: decode, format: protobuf, schema_file: '{pb}'}",
     "format protobuf needs schema_file (a descriptor set) and message (the full message "
     "name), with or without a registry; found no message"),
    ("{type: decode, format: protobuf, schema_file: '{pb}', message: Order}",
     "expected a message that '{pb}' defines, found 'Order', which it does not (it has: "
     "shop.v1.Order, shop.v1.Order.Address, shop.v1.Item; give the full name"),
    ("{type: decode, format: protobuf, schema_file: '{proto}', message: Order}",
     "expected a binary FileDescriptorSet in '{proto}' (protoc --descriptor_set_out=FILE "
     "--include_imports), found bytes that do not parse"),
    ("{type: decode, format: protobuf, schema_file: '{empty}', message: Order}",
     "expected a FileDescriptorSet with at least one file in '{empty}', found none"),
    ("{type: decode, format: msgpack, schema_file: '{avsc}'}", "format msgpack takes no "
     "schema_file"),
    ("{type: decode, format: avro, schema_file: '{avsc}', message: x.Y}",
     "message is a Protobuf option; format avro takes none"),
    ("{type: encode, format: json, registry: " + REG + "}", "format json takes no registry"),
    ("{type: encode, format: msgpack, wire_format: confluent}",
     "wire_format confluent is not available for encode with format msgpack"),
    ("{type: encode, format: avro, schema_file: '{avsc}', wire_format: confluent}",
     "wire_format confluent needs registry: encode writes the schema id the registry gives"),
    ("{type: decode, format: avro, registry: " + REG + ", wire_format: none}",
     "decode with registry reads each payload's schema id from its Confluent header"),
    ("{type: decode, format: avro, registry: {url: 'http://h', auto_register: true}}",
     "registry.auto_register is an encode option"),
    ("{type: encode, format: avro, registry: {url: 'http://h', auto_register: true}}",
     "registry.auto_register needs schema_file: the schema to register"),
    ("{type: encode, format: avro, registry: {url: 'http://h', subject_strategy: record}}",
     "subject_strategy record needs schema_file: the record name comes from the schema"),
    ("{type: encode, format: avro, schema_file: '{unnamed}', registry: {url: 'http://h', "
     "subject_strategy: topic_record}}",
     "subject_strategy topic_record needs a named schema (a record)"),
    ("{type: encode, format: avro, registry: {url: 'ftp://h'}}",
     "expected an http:// or https:// URL with a host"),
    ("{type: encode, format: avro, registry: {url: 'http://h', username: u}}",
     "registry: username and password go together"),
    ("{type: encode, format: avro, registry: {url: 'http://h', timeout: 0s}}",
     "expected a duration above 0"),
    ("{type: encode, format: xml}", "expected 'json', 'avro', 'protobuf' or 'msgpack'"),
    ("{type: decode, format: avro, schema_file: '{avsc}', extra_fields: reject}",
     "unknown key 'extra_fields'"),
])
def test_config_errors(files: dict[str, str], transform: str, message: str) -> None:
    for name, path in files.items():
        transform = transform.replace("{" + name + "}", path)
        message = message.replace("{" + name + "}", path)
    err = error(transform)
    assert message in err.message, err.message


def test_a_password_never_shows_in_an_error() -> None:
    err = error("{type: decode, format: avro, registry: {url: 'http://h', password: hunter2}}")
    assert "username and password go together" in err.message
    assert "hunter2" not in str(err)


def test_encode_with_a_registry_refuses_imports_it_cannot_reference(tmp_path: Path) -> None:
    from google.protobuf import descriptor_pb2

    dep = descriptor_pb2.FileDescriptorProto(name="common.proto", package="c", syntax="proto3")
    dep.message_type.add(name="Money")
    main = descriptor_pb2.FileDescriptorProto(name="main.proto", package="m", syntax="proto3",
                                              dependency=["common.proto"])
    msg = main.message_type.add(name="Order")
    msg.field.add(name="price", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, type_name=".c.Money")
    path = tmp_path / "two.pb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[dep, main]).SerializeToString())
    err = error(f"{{type: encode, format: protobuf, schema_file: '{path}', message: m.Order, "
                f"registry: {REG}}}")
    assert "imports common.proto: schema references are not supported" in err.message
    # without a registry, or to decode, the import is fine
    Encode.make_test_instance(format="protobuf", schema_file=str(path), message="m.Order")
    Decode.make_test_instance(format="protobuf", schema_file=str(path), message="m.Order",
                              registry={"url": "http://h"})
    # and one the set lacks is named
    lacking = tmp_path / "lacking.pb"
    lacking.write_bytes(descriptor_pb2.FileDescriptorSet(file=[main]).SerializeToString())
    err = error(f"{{type: decode, format: protobuf, schema_file: '{lacking}', message: m.Order}}")
    assert "to hold 'common.proto', which 'main.proto' imports" in err.message
    assert "--include_imports" in err.message


def test_valid_configs_and_their_defaults(files: dict[str, str]) -> None:
    loaded = load_text(pipeline(
        f"{{type: encode, format: avro, schema_file: '{files['avsc']}', "
        "registry: {url: 'http://u:pw@127.0.0.1:8081/apis/ccompat/v7/'}}"), env={})
    config = loaded.pipelines[0].transforms[0].config
    assert config.effective_wire_format == "confluent"  # type: ignore[attr-defined]
    assert config.registry.url == "http://u:pw@127.0.0.1:8081/apis/ccompat/v7"  # type: ignore[attr-defined]
    assert config.registry.subject_strategy == "topic"  # type: ignore[attr-defined]
    assert config.registry.cache_ttl == 300  # type: ignore[attr-defined]
    assert not config.registry.auto_register  # type: ignore[attr-defined]
    plain = Decode.make_test_instance(format="avro", schema_file=files["avsc"])
    assert plain.config.effective_wire_format == "none"
    encode = Encode.make_test_instance(format="avro", schema_file=files["avsc"],
                                       registry={"url": "http://u:pw@h:1/x"})
    assert encode.registry is not None
    assert encode.registry.where == "http://h:1/x"  # what errors show: no user info


def test_natsconn_validate_reports_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "codec.yaml"
    file.write_text(pipeline(f"{{type: decode, format: avro, schema_file: "
                             f"'{tmp_path / 'gone.avsc'}'}}"))
    natsconn = Path(sys.executable).with_name("natsconn")
    result = subprocess.run([str(natsconn), "validate", str(file)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {file}:5: pipelines[0].transforms[0]"), result.stderr
    assert "expected an Avro schema file (.avsc)" in result.stderr
    assert "Traceback" not in result.stderr
