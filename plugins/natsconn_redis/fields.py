"""How a stream entry's fields map to a message, both ways.

An entry written by the ``redis_stream`` sink, with the default names::

    data     <- Message.data (bytes, as they are)
    subject  <- Message.subject, when the message has one
    key      <- Message.key, when the message has one
    <prefix><Name> <- each header Name (header_prefix is empty by default)

The ``redis_stream`` source reads it back the same way: ``data`` (missing: empty
data), ``subject`` (missing: the stream's name), ``key``, and every other field
as a header (the prefix stripped where present). Header names and values and
the subject are text: bytes that are not UTF-8 are kept as lone surrogates
(``surrogateescape``, as the Kafka plugins do), so a Redis or Kafka sink writes
them back byte for byte, and a NATS sink, which cannot carry them, rejects the
message (dead letter, with the reason) instead of receiving altered text. Set a
field name to null to leave that part out.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field, model_validator

from connector import Message, PluginConfig, RejectedError

from .connection import TEXT_ERRORS


class FieldMapping(PluginConfig):
    data_field: str = Field("data", min_length=1, description="field holding the payload")
    subject_field: str | None = Field("subject", description="field holding the subject; "
                                      "null: none")
    key_field: str | None = Field("key", description="field holding the key; null: none")
    header_prefix: str = Field("", description="prefix of the fields that are headers "
                               "(written by the sink, stripped by the source)")

    @model_validator(mode="after")
    def _distinct(self) -> FieldMapping:
        names = [n for n in (self.data_field, self.subject_field, self.key_field) if n]
        if len(set(names)) != len(names):
            raise ValueError(f"data_field, subject_field and key_field must differ, "
                             f"found {names}")
        return self


class EntryDecoder:
    """Fields of one entry → (data, subject, key, headers); compiled once."""

    __slots__ = ("_data", "_key", "_prefix", "_subject")

    def __init__(self, mapping: FieldMapping) -> None:
        self._data = mapping.data_field.encode()
        self._subject = mapping.subject_field.encode() if mapping.subject_field else None
        self._key = mapping.key_field.encode() if mapping.key_field else None
        self._prefix = mapping.header_prefix.encode()

    def message(self, fields: dict[bytes, bytes], stream: str, entry_id: str,
                extra: Mapping[str, str] | None = None) -> Message:
        """``fields`` is consumed (the reply's own dict: no copy on the hot path)."""
        data = fields.pop(self._data, b"")
        raw_subject = fields.pop(self._subject, None) if self._subject else None
        key = fields.pop(self._key, None) if self._key else None
        headers: dict[str, str]
        if not fields:
            headers = {}
        elif not self._prefix:
            headers = {k.decode("utf-8", TEXT_ERRORS): v.decode("utf-8", TEXT_ERRORS)
                       for k, v in fields.items()}
        else:
            prefix, cut = self._prefix, len(self._prefix)
            headers = {(k[cut:] if k.startswith(prefix) else k).decode("utf-8", TEXT_ERRORS):
                       v.decode("utf-8", TEXT_ERRORS) for k, v in fields.items()}
        if extra:
            headers.update(extra)
        ms = entry_id[:entry_id.find("-")]
        return Message(data,
                       raw_subject.decode("utf-8", TEXT_ERRORS) if raw_subject else stream,
                       key, headers, int(ms) / 1000 if ms.isdigit() else None,
                       f"{stream}:{entry_id}")


class EntryEncoder:
    """A message → the flat field/value list of an XADD; compiled once."""

    __slots__ = ("_data", "_id", "_key", "_prefix", "_reserved", "_subject")

    def __init__(self, mapping: FieldMapping, id_field: str | None = None) -> None:
        self._data = mapping.data_field
        self._subject = mapping.subject_field
        self._key = mapping.key_field
        self._id = id_field
        self._prefix = mapping.header_prefix
        self._reserved = frozenset(
            n for n in (self._data, self._subject, self._key, id_field) if n)

    def fields(self, m: Message) -> list[str | bytes]:
        out: list[str | bytes] = [self._data, m.data]
        if self._subject is not None and m.subject is not None:
            out += (self._subject, m.subject)
        if self._key is not None and m.key is not None:
            out += (self._key, m.key)
        if self._id is not None and m.id is not None:
            out += (self._id, m.id)
        if m.headers:
            prefix = self._prefix
            for name, value in m.headers.items():
                field = prefix + name
                if field in self._reserved:
                    raise RejectedError(
                        f"header {name!r} would overwrite the entry's {field!r} field; "
                        "set header_prefix so that headers get their own names")
                out += (field, value)
        return out
