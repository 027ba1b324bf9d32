"""The ``decode`` and ``encode`` transforms.

``decode`` turns Avro, Protobuf or MessagePack payloads (optionally in the
Confluent wire format) into UTF-8 JSON; ``encode`` turns JSON into the format.
Schemas come from a local file or a schema registry (registry.py). Payloads
that do not fit are rejected one by one (the engine dead-letters them with the
reason and the rest of the batch flows on).

``process`` answers synchronously whenever every schema a batch needs is
cached (always, without a registry); only a batch that needs the registry gets
a coroutine back, which the engine awaits.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from connector import (
    Message,
    PluginConfig,
    PluginContext,
    Rejected,
    RejectedError,
    Transform,
)

from . import wire
from .codecs import (
    AvroCodec,
    JsonCodec,
    MsgpackCodec,
    ProtobufCodec,
    avro_name,
    load_avro_schema,
    load_descriptors,
    parse_avro,
)
from .registry import RegisteredSchema, RegistryClient, RegistryConfig

Format = Literal["json", "avro", "protobuf", "msgpack"]
Result = Sequence[Message | Rejected]
_SCHEMA_TYPES = {"avro": "AVRO", "protobuf": "PROTOBUF", "json": "JSON"}


def _beside_the_file(path: str, info: ValidationInfo) -> str:
    """A relative path is the pipeline file's folder's; if nothing is there, the
    working directory's (as before)."""
    base = (info.context or {}).get("base_dir")
    if base is None or os.path.isabs(path):
        return path
    candidate = os.path.join(base, path)
    return candidate if os.path.exists(candidate) else path


class CodecConfig(PluginConfig):
    direction: ClassVar[str] = "decode"

    format: Format = Field(description="json, avro, protobuf or msgpack")
    schema_file: str | None = Field(
        None, description="Avro: a .avsc file; Protobuf: a descriptor set (protoc "
                          "--descriptor_set_out --include_imports)")
    message: str | None = Field(None, description="Protobuf: the message's full name, "
                                                  "e.g. 'shop.v1.Order'")
    registry: RegistryConfig | None = Field(None, description="a Confluent-compatible schema "
                                                              "registry")
    wire_format: Literal["confluent", "none"] | None = Field(
        None, description="confluent: magic byte 0, 4-byte schema id (and the Protobuf "
                          "message indexes) before the payload; default: confluent with a "
                          "registry, else none")
    json_names: Literal["proto", "json"] = Field(
        "proto", description="Protobuf: JSON keys are the .proto field names (proto) or "
                             "their lowerCamelCase JSON names (json)")

    @field_validator("schema_file")
    @classmethod
    def _schema_loads(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if value is None or fmt is None:
            return value
        if fmt in ("json", "msgpack"):
            raise ValueError(f"format {fmt} takes no schema_file")
        value = _beside_the_file(value, info)
        if fmt == "avro":
            load_avro_schema(value)
        else:
            load_descriptors(value)
        return value

    @field_validator("message")
    @classmethod
    def _message_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if value is None or fmt is None:
            return value
        if fmt != "protobuf":
            raise ValueError(f"message is a Protobuf option; format {fmt} takes none")
        path = info.data.get("schema_file")
        if path is not None:
            load_descriptors(path).find(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CodecConfig:
        fmt, reg, file = self.format, self.registry, self.schema_file
        decode = self.direction == "decode"
        if fmt in ("json", "msgpack"):
            if reg is not None:
                raise ValueError(f"format {fmt} takes no registry (only avro and protobuf "
                                 "schemas are looked up)")
            if self.wire_format == "confluent" and not (decode and fmt == "json"):
                raise ValueError(f"wire_format confluent is not available for {self.direction} "
                                 f"with format {fmt} (decode json strips the header; nothing "
                                 "else writes or reads it without a schema)")
            return self
        if fmt == "protobuf":
            if file is None or self.message is None:
                raise ValueError(
                    "format protobuf needs schema_file (a descriptor set) and message (the "
                    "full message name), with or without a registry; found "
                    + ("neither" if file is None and self.message is None
                       else "no schema_file" if file is None else "no message"))
        elif file is None and reg is None:
            raise ValueError("format avro needs schema_file (a .avsc) or registry to take the "
                             "schema from, found neither")
        wire_format = self.effective_wire_format
        if reg is None:
            if not decode and wire_format == "confluent":
                raise ValueError("wire_format confluent needs registry: encode writes the "
                                 "schema id the registry gives (or set wire_format: none)")
            return self
        if decode:
            if wire_format != "confluent":
                raise ValueError("decode with registry reads each payload's schema id from its "
                                 "Confluent header; with wire_format none, give schema_file "
                                 "and no registry")
            if reg.auto_register:
                raise ValueError("registry.auto_register is an encode option; decode only "
                                 "reads schemas")
            return self
        if fmt == "avro" and file is None:
            if reg.auto_register:
                raise ValueError("registry.auto_register needs schema_file: the schema to "
                                 "register (without it, encode uses the subject's latest "
                                 "version)")
            if reg.subject_strategy != "topic":
                raise ValueError(f"subject_strategy {reg.subject_strategy} needs schema_file: "
                                 "the record name comes from the schema")
        if fmt == "avro" and file is not None and reg.subject_strategy != "topic":
            schema, _ = load_avro_schema(file)
            if avro_name(schema) is None:
                raise ValueError(f"subject_strategy {reg.subject_strategy} needs a named "
                                 f"schema (a record), found an unnamed one in {file!r}")
        if fmt == "protobuf" and file is not None and self.message is not None:
            codec = ProtobufCodec(load_descriptors(file), self.message)
            beyond = codec.imports_beyond_well_known()
            if beyond:
                raise ValueError(
                    f"encode with a registry sends {codec.file.name!r} as the schema, but it "
                    f"imports {', '.join(beyond)}: schema references are not supported; "
                    "put the messages in one .proto (well-known google/protobuf imports are fine)")
        return self

    @property
    def effective_wire_format(self) -> str:
        if self.wire_format is not None:
            return self.wire_format
        return "confluent" if self.registry is not None else "none"


class DecodeConfig(CodecConfig):
    direction: ClassVar[str] = "decode"


class EncodeConfig(CodecConfig):
    direction: ClassVar[str] = "encode"

    extra_fields: Literal["ignore", "reject"] = Field(
        "ignore", description="JSON keys the schema does not have: left out (ignore) or the "
                              "message rejected (reject)")


class _Codec(Transform[CodecConfig]):
    """What decode and encode share: the codec, the registry client, the lifecycle."""

    def __init__(self, config: CodecConfig, context: PluginContext | None = None) -> None:
        super().__init__(config, context)
        self.confluent = config.effective_wire_format == "confluent"
        self.registry = RegistryClient(config.registry) if config.registry is not None else None
        reject_extra = getattr(config, "extra_fields", "ignore") == "reject"
        self.codec: AvroCodec | ProtobufCodec | JsonCodec | MsgpackCodec
        self.schema_text: str | None = None
        if config.format == "json":
            self.codec = JsonCodec()
        elif config.format == "msgpack":
            self.codec = MsgpackCodec()
        elif config.format == "protobuf":
            assert config.schema_file is not None and config.message is not None
            self.codec = ProtobufCodec(load_descriptors(config.schema_file), config.message,
                                       proto_names=config.json_names == "proto",
                                       reject_extra=reject_extra)
            self.schema_text = self.codec.schema_text()
        elif config.schema_file is not None:
            schema, self.schema_text = load_avro_schema(config.schema_file)
            self.codec = AvroCodec(schema, reject_extra=reject_extra)
        else:
            self.codec = JsonCodec()  # placeholder: encode takes its schemas from the registry
        self.reject_extra = reject_extra

    async def connect(self) -> None:
        if self.registry is not None:
            await self.registry.connect()

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()


class Decode(_Codec):
    """Turns Avro, Protobuf or MessagePack payloads into JSON (checks JSON ones)."""

    Config = DecodeConfig

    def __init__(self, config: CodecConfig, context: PluginContext | None = None) -> None:
        super().__init__(config, context)
        # Registry: writer schema id -> codec (Avro: its own; Protobuf: the local one,
        # after the registry confirmed the id is a Protobuf schema).
        self._by_id: dict[int, AvroCodec | ProtobufCodec] = {}
        self._refused: dict[int, str] = {}  # ids the last fetch rejected, with the reason
        self._reader = (self.codec.schema if isinstance(self.codec, AvroCodec)
                        and self.registry is not None else None)

    def process(self, messages: list[Message]) -> Result | Awaitable[Result]:
        if self.registry is None:
            return self._decode_all(messages)
        missing: set[int] = set()
        by_id = self._by_id
        for m in messages:
            data = m.data
            if len(data) >= wire.HEADER_SIZE and data[0] == wire.MAGIC:
                schema_id = int.from_bytes(data[1:5], "big")
                if schema_id not in by_id:
                    missing.add(schema_id)
        if not missing:
            return self._decode_all(messages)
        return self._fetch_then_decode(messages, missing)

    async def _fetch_then_decode(self, messages: list[Message], missing: set[int]) -> Result:
        ids = sorted(missing)
        results = await asyncio.gather(*(self._load(i) for i in ids), return_exceptions=True)
        for schema_id, result in zip(ids, results, strict=True):
            if isinstance(result, RejectedError):
                _remember(self._refused, schema_id, str(result))
            elif isinstance(result, BaseException):
                raise result
        return self._decode_all(messages)

    async def _load(self, schema_id: int) -> None:
        assert self.registry is not None
        found = await self.registry.schema_by_id(schema_id)
        want = _SCHEMA_TYPES[self.config.format]
        if found.schema_type != want:
            raise RejectedError(f"schema id {schema_id} is a {found.schema_type} schema; this "
                                f"decode reads {want}")
        if isinstance(self.codec, ProtobufCodec):
            self._by_id[schema_id] = self.codec
        else:
            schema = await _avro_from_registry(self.registry, found)
            self._by_id[schema_id] = AvroCodec(schema, reader=self._reader,
                                               label=f"Avro schema id {schema_id}")
        self._refused.pop(schema_id, None)

    def _decode_all(self, messages: list[Message]) -> Result:
        out: list[Message | Rejected] = []
        append = out.append
        decode = self._decode
        for m in messages:
            try:
                data = decode(m.data)
            except RejectedError as exc:
                append(Rejected(m, str(exc)))
                continue
            append(Message(data, m.subject, m.key, m.headers, m.timestamp, m.id))
        return out

    def _decode(self, data: bytes) -> bytes:
        codec = self.codec
        if not self.confluent:
            return codec.to_json(data)
        schema_id, offset = wire.split(data)
        if self.registry is not None:
            found = self._by_id.get(schema_id)
            if found is None:
                raise RejectedError(self._refused.get(schema_id)
                                    or f"unknown schema id {schema_id}")
            codec = found
        if isinstance(codec, ProtobufCodec):
            indexes, offset = wire.read_indexes(data, offset)
            return codec.to_json(data, offset, codec.message_at(indexes))
        return codec.to_json(data, offset)


class Encode(_Codec):
    """Turns JSON payloads into Avro, Protobuf or MessagePack (checks JSON ones)."""

    Config = EncodeConfig

    def __init__(self, config: CodecConfig, context: PluginContext | None = None) -> None:
        super().__init__(config, context)
        # Registry: subject -> (good until, header bytes, codec), or the reason it failed.
        self._targets: dict[str, tuple[float, bytes, AvroCodec | ProtobufCodec]] = {}
        self._refused: dict[str, str] = {}
        self._codecs_by_id: dict[int, AvroCodec] = {}
        self._latest = config.registry is not None and config.schema_file is None
        reg = config.registry
        name: str | None = getattr(self.codec, "full_name", None)
        self._strategy = reg.subject_strategy if reg is not None else "topic"
        self._name = name
        self._static_subject: str | None = name if self._strategy == "record" else None

    def subject_of(self, message: Message) -> str:
        """The registry subject for ``message`` (RejectedError when it has none)."""
        if self._static_subject is not None:
            return self._static_subject
        if not message.subject:
            raise RejectedError(f"subject_strategy {self._strategy} names the registry subject "
                                "after the message's subject, and this message has none")
        if self._strategy == "topic":
            return f"{message.subject}-value"
        return f"{message.subject}-{self._name}"

    def process(self, messages: list[Message]) -> Result | Awaitable[Result]:
        if self.registry is None:
            return self._encode_all(messages)
        now = time.monotonic() if self._latest else 0.0
        missing: set[str] = set()
        targets = self._targets
        for m in messages:
            try:
                subject = self.subject_of(m)
            except RejectedError:
                continue
            hit = targets.get(subject)
            if hit is None or hit[0] < now:
                missing.add(subject)
        if not missing:
            return self._encode_all(messages)
        return self._resolve_then_encode(messages, missing)

    async def _resolve_then_encode(self, messages: list[Message], missing: set[str]) -> Result:
        subjects = sorted(missing)
        results = await asyncio.gather(*(self._resolve(s) for s in subjects),
                                       return_exceptions=True)
        for subject, result in zip(subjects, results, strict=True):
            if isinstance(result, RejectedError):
                _remember(self._refused, subject, str(result))
                self._targets.pop(subject, None)
            elif isinstance(result, BaseException):
                raise result
            else:
                self._refused.pop(subject, None)
        return self._encode_all(messages)

    async def _resolve(self, subject: str) -> None:
        assert self.registry is not None
        if self._latest:
            found = await self.registry.latest(subject)
            if found is None:
                raise RejectedError(f"no schema is registered under subject {subject!r} "
                                    "(encode without schema_file uses the latest version)")
            if found.schema_type != "AVRO":
                raise RejectedError(f"subject {subject!r} holds a {found.schema_type} schema; "
                                    "this encode writes AVRO")
            codec = self._codecs_by_id.get(found.id)
            if codec is None:
                schema = await _avro_from_registry(self.registry, found)
                codec = AvroCodec(schema, reject_extra=self.reject_extra,
                                  label=f"Avro schema id {found.id} (subject {subject!r})")
                self._codecs_by_id[found.id] = codec
            until = time.monotonic() + self.registry.config.cache_ttl
            self._targets[subject] = (until, wire.header(found.id), codec)
            return
        assert self.schema_text is not None
        local = self.codec
        assert isinstance(local, AvroCodec | ProtobufCodec)
        schema_id = await self.registry.id_for(
            subject, self.schema_text, _SCHEMA_TYPES[self.config.format],
            register=self.registry.config.auto_register)
        indexes = local.indexes if isinstance(local, ProtobufCodec) else None
        self._targets[subject] = (math.inf, wire.header(schema_id, indexes), local)

    def _encode_all(self, messages: list[Message]) -> Result:
        out: list[Message | Rejected] = []
        append = out.append
        if self.registry is None:
            codec = self.codec
            encode = codec.from_json
            for m in messages:
                try:
                    data = encode(m.data)
                except RejectedError as exc:
                    append(Rejected(m, str(exc)))
                    continue
                append(Message(data, m.subject, m.key, m.headers, m.timestamp, m.id))
            return out
        targets = self._targets
        for m in messages:
            try:
                subject = self.subject_of(m)
                hit = targets.get(subject)
                if hit is None:
                    raise RejectedError(self._refused.get(subject)
                                        or f"no schema id for subject {subject!r}")
                data = hit[2].from_json(m.data, hit[1])
            except RejectedError as exc:
                append(Rejected(m, str(exc)))
                continue
            append(Message(data, m.subject, m.key, m.headers, m.timestamp, m.id))
        return out


_MAX_REFUSED = 1024


def _remember(refused: dict[Any, str], key: Any, reason: str) -> None:
    """The reason a schema id or subject failed, for the messages that need it
    (asked again with the next batch that needs it; bounded)."""
    if len(refused) >= _MAX_REFUSED:
        refused.clear()
    refused[key] = reason


async def _avro_from_registry(registry: RegistryClient, found: RegisteredSchema,
                              depth: int = 0) -> Any:
    """A registry's Avro schema parsed, its references (named types from other
    subjects) first."""
    named: dict[str, Any] = {}
    await _avro_references(registry, found, named, depth)
    try:
        raw = json.loads(found.schema)
    except ValueError as exc:
        raise RejectedError(f"schema id {found.id} is not JSON: {exc}") from None
    try:
        return parse_avro(raw, f"(schema id {found.id})", named)
    except ValueError as exc:
        raise RejectedError(str(exc)) from None


async def _avro_references(registry: RegistryClient, found: RegisteredSchema,
                           named: dict[str, Any], depth: int) -> None:
    if depth > 16:
        raise RejectedError(f"schema id {found.id}: references nest deeper than 16")
    for ref in found.references:
        dep = await registry.version(ref.subject, ref.version)
        await _avro_references(registry, dep, named, depth + 1)
        try:
            parse_avro(json.loads(dep.schema), f"(reference {ref.subject!r} v{ref.version})",
                       named)
        except ValueError as exc:
            raise RejectedError(str(exc)) from None


__all__ = ["Decode", "DecodeConfig", "Encode", "EncodeConfig"]
