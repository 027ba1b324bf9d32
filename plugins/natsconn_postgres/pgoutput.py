"""Decoding of ``pgoutput``, PostgreSQL's built-in logical decoding output plugin.

Protocol version 1 (PostgreSQL 10+): each ``XLogData`` payload of the
replication stream is one message, its first byte the kind:

``B`` Begin (final LSN, commit time, xid), ``C`` Commit (flags, commit LSN,
end LSN, commit time), ``O`` Origin, ``R`` Relation (the columns of a table,
sent before the first change of it and again whenever it changed), ``Y`` Type
(a non-built-in type's name), ``I`` Insert, ``U`` Update, ``D`` Delete, ``T``
Truncate, ``M`` a logical decoding message.

A tuple is a column count and, per column, ``n`` (NULL), ``u`` (an unchanged
TOASTed value the server did not send), ``t`` (the value in text format,
length-prefixed) or ``b`` (binary format; only with the ``binary`` option,
which this decoder does not request).

Pure functions on bytes, no I/O: the unit tests build byte strings by hand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

PG_EPOCH: Final = 946_684_800  # 2000-01-01T00:00:00Z in Unix seconds


class DecodeError(ValueError):
    """A payload that is not valid pgoutput (or uses a feature not decoded here)."""


class _Unchanged:
    """The value of a TOASTed column that an UPDATE did not change: not sent."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

# One column value: text-format bytes, None for NULL, UNCHANGED for 'u'.
Value = bytes | None | _Unchanged


@dataclass(slots=True)
class Column:
    name: str
    type_oid: int
    typmod: int
    key: bool  # part of the replica identity (the primary key, or all with FULL)


@dataclass(slots=True)
class Relation:
    oid: int
    schema: str
    table: str
    replica_identity: str  # d(efault: primary key), n(othing), f(ull), i(ndex)
    columns: list[Column]
    # Filled by the consumer (converters, names); the decoder leaves it alone.
    cache: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class Begin:
    final_lsn: int  # the LSN of the commit record
    commit_time: int  # microseconds since 2000-01-01 UTC
    xid: int


@dataclass(slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int  # the LSN just past the commit record: what to confirm
    commit_time: int


@dataclass(slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(slots=True)
class TypeInfo:
    oid: int
    schema: str
    name: str


@dataclass(slots=True)
class Insert:
    relation: int
    new: list[Value]


@dataclass(slots=True)
class Update:
    relation: int
    old_kind: str | None  # 'K' (old key: the key changed), 'O' (old row, FULL) or None
    old: list[Value] | None
    new: list[Value]


@dataclass(slots=True)
class Delete:
    relation: int
    old_kind: str  # 'K' or 'O'
    old: list[Value]


@dataclass(slots=True)
class Truncate:
    relations: list[int]
    cascade: bool
    restart_identity: bool


@dataclass(slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Decoded = (Begin | Commit | Origin | Relation | TypeInfo | Insert | Update | Delete | Truncate
           | LogicalMessage)

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_U32_B = struct.Struct("!IB")

_NULL, _TOAST, _TEXT, _BINARY = 0x6E, 0x75, 0x74, 0x62  # n u t b


def lsn_text(lsn: int) -> str:
    """``0/16B3748``: PostgreSQL's own notation."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, sep, lo = text.partition("/")
    if not sep:
        raise ValueError(f"expected an LSN such as 0/16B3748, found {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise DecodeError("unterminated string")
    return buf[pos:end].decode("utf-8"), end + 1


def _tuple(buf: bytes, pos: int) -> tuple[list[Value], int]:
    (ncols,) = _I16.unpack_from(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    unpack = _I32.unpack_from
    for _ in range(ncols):
        kind = buf[pos]
        pos += 1
        if kind == _TEXT:
            (n,) = unpack(buf, pos)
            pos += 4
            end = pos + n
            if end > len(buf):
                raise DecodeError("tuple value runs past the end of the message")
            append(buf[pos:end])
            pos = end
        elif kind == _NULL:
            append(None)
        elif kind == _TOAST:
            append(UNCHANGED)
        elif kind == _BINARY:
            raise DecodeError("binary-format tuple value: the binary option is not supported")
        else:
            raise DecodeError(f"unknown tuple value kind {chr(kind)!r}")
    return values, pos


def decode(buf: bytes) -> Decoded:
    """One pgoutput message. Raises :class:`DecodeError` on anything else."""
    if not buf:
        raise DecodeError("empty message")
    kind = buf[0]
    try:
        if kind == 0x49:  # I
            oid, marker = _U32_B.unpack_from(buf, 1)
            if marker != 0x4E:  # N
                raise DecodeError(f"insert: expected 'N', found {chr(marker)!r}")
            new, _ = _tuple(buf, 6)
            return Insert(oid, new)
        if kind == 0x55:  # U
            oid, marker = _U32_B.unpack_from(buf, 1)
            pos = 6
            old_kind: str | None = None
            old: list[Value] | None = None
            if marker in (0x4B, 0x4F):  # K O
                old_kind = chr(marker)
                old, pos = _tuple(buf, pos)
                marker = buf[pos]
                pos += 1
            if marker != 0x4E:
                raise DecodeError(f"update: expected 'N', found {chr(marker)!r}")
            new, _ = _tuple(buf, pos)
            return Update(oid, old_kind, old, new)
        if kind == 0x44:  # D
            oid, marker = _U32_B.unpack_from(buf, 1)
            if marker not in (0x4B, 0x4F):
                raise DecodeError(f"delete: expected 'K' or 'O', found {chr(marker)!r}")
            old_d, _ = _tuple(buf, 6)
            return Delete(oid, chr(marker), old_d)
        if kind == 0x42:  # B
            final_lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
            return Begin(final_lsn, ts, xid)
        if kind == 0x43:  # C
            flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 1)
            return Commit(flags, commit_lsn, end_lsn, ts)
        if kind == 0x52:  # R
            (oid,) = _U32.unpack_from(buf, 1)
            schema, pos = _cstring(buf, 5)
            table, pos = _cstring(buf, pos)
            identity = chr(buf[pos])
            (ncols,) = _I16.unpack_from(buf, pos + 1)
            pos += 3
            columns = []
            for _ in range(ncols):
                flags = buf[pos]
                name, pos = _cstring(buf, pos + 1)
                type_oid, typmod = struct.unpack_from("!Ii", buf, pos)
                pos += 8
                columns.append(Column(name, type_oid, typmod, bool(flags & 1)))
            return Relation(oid, schema or "pg_catalog", table, identity, columns)
        if kind == 0x54:  # T
            nrels, options = struct.unpack_from("!iB", buf, 1)
            oids = list(struct.unpack_from(f"!{nrels}I", buf, 6))
            return Truncate(oids, bool(options & 1), bool(options & 2))
        if kind == 0x59:  # Y
            (oid,) = _U32.unpack_from(buf, 1)
            schema, pos = _cstring(buf, 5)
            name, _ = _cstring(buf, pos)
            return TypeInfo(oid, schema, name)
        if kind == 0x4F:  # O
            (lsn,) = struct.unpack_from("!Q", buf, 1)
            name, _ = _cstring(buf, 9)
            return Origin(lsn, name)
        if kind == 0x4D:  # M
            flags, lsn = struct.unpack_from("!BQ", buf, 1)
            prefix, pos = _cstring(buf, 10)
            (n,) = _I32.unpack_from(buf, pos)
            return LogicalMessage(bool(flags & 1), lsn, prefix, bytes(buf[pos + 4:pos + 4 + n]))
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise DecodeError(f"truncated or malformed {chr(kind)!r} message: {exc}") from None
    if kind in b"SEcAPKrb":
        raise DecodeError(f"message {chr(kind)!r} belongs to protocol version 2+ (streamed "
                          "or two-phase transactions), which is not requested")
    raise DecodeError(f"unknown message kind {chr(kind)!r}")
