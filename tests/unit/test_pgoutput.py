"""The pgoutput decoder and the text-value mapping, on byte strings built here
from the protocol documentation (no server)."""

from __future__ import annotations

import base64
import struct

import pytest
from natsconn_postgres import pgoutput as pgo
from natsconn_postgres.pgtypes import TypeRegistry, parse_array


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(*values: bytes | str | None) -> bytes:
    """``str`` 'u' marks an unchanged TOAST value; bytes are text values."""
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == "u":
            out += b"u"
        else:
            assert isinstance(v, bytes)
            out += b"t" + struct.pack("!i", len(v)) + v
    return out


def relation(oid: int, schema: str, table: str, identity: str,
             cols: list[tuple[str, int, bool]]) -> bytes:
    out = b"R" + struct.pack("!I", oid) + cstr(schema) + cstr(table) + identity.encode()
    out += struct.pack("!h", len(cols))
    for name, type_oid, key in cols:
        out += struct.pack("!B", 1 if key else 0) + cstr(name) + struct.pack("!Ii", type_oid, -1)
    return out


def test_begin_and_commit() -> None:
    begin = pgo.decode(b"B" + struct.pack("!QqI", 0x1_0000_0010, 123_456, 777))
    assert begin == pgo.Begin(0x1_0000_0010, 123_456, 777)
    commit = pgo.decode(b"C" + struct.pack("!BQQq", 0, 0x1_0000_0010, 0x1_0000_0040, 99))
    assert commit == pgo.Commit(0, 0x1_0000_0010, 0x1_0000_0040, 99)
    assert pgo.lsn_text(0x1_0000_0010) == "1/10"
    assert pgo.parse_lsn("1/10") == 0x1_0000_0010
    assert pgo.parse_lsn(pgo.lsn_text(0x16B3748)) == 0x16B3748


def test_relation_with_pg_catalog_namespace_and_keys() -> None:
    msg = pgo.decode(relation(16384, "", "t", "d", [("id", 23, True), ("v", 25, False)]))
    assert isinstance(msg, pgo.Relation)
    assert (msg.oid, msg.schema, msg.table, msg.replica_identity) == (16384, "pg_catalog", "t",
                                                                     "d")
    assert [(c.name, c.type_oid, c.key) for c in msg.columns] == [("id", 23, True),
                                                                  ("v", 25, False)]


def test_insert_update_delete_tuples() -> None:
    ins = pgo.decode(b"I" + struct.pack("!I", 5) + b"N" + tuple_data(b"1", None, b"x y"))
    assert ins == pgo.Insert(5, [b"1", None, b"x y"])
    # update with the old key (the key changed) and an unchanged TOAST value
    upd = pgo.decode(b"U" + struct.pack("!I", 5) + b"K" + tuple_data(b"1", None, None)
                     + b"N" + tuple_data(b"2", "u", b"z"))
    assert isinstance(upd, pgo.Update)
    assert upd.old_kind == "K" and upd.old == [b"1", None, None]
    assert upd.new == [b"2", pgo.UNCHANGED, b"z"]
    plain = pgo.decode(b"U" + struct.pack("!I", 5) + b"N" + tuple_data(b"3"))
    assert plain == pgo.Update(5, None, None, [b"3"])
    full = pgo.decode(b"D" + struct.pack("!I", 5) + b"O" + tuple_data(b"3", b"a"))
    assert full == pgo.Delete(5, "O", [b"3", b"a"])


def test_truncate_type_origin_message() -> None:
    t = pgo.decode(b"T" + struct.pack("!iB", 2, 3) + struct.pack("!II", 10, 11))
    assert t == pgo.Truncate([10, 11], True, True)
    y = pgo.decode(b"Y" + struct.pack("!I", 90000) + cstr("app") + cstr("mood"))
    assert y == pgo.TypeInfo(90000, "app", "mood")
    o = pgo.decode(b"O" + struct.pack("!Q", 42) + cstr("upstream"))
    assert o == pgo.Origin(42, "upstream")
    m = pgo.decode(b"M" + struct.pack("!BQ", 1, 7) + cstr("p") + struct.pack("!i", 3) + b"abc")
    assert m == pgo.LogicalMessage(True, 7, "p", b"abc")


@pytest.mark.parametrize("payload, text", [
    (b"", "empty"),
    (b"Z", "unknown message kind"),
    (b"S" + b"\0" * 8, "protocol version 2"),
    (b"I" + struct.pack("!I", 5) + b"X", "expected 'N'"),
    (b"I" + struct.pack("!I", 5) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", 9)
     + b"ab", "past the end"),
    (b"I" + struct.pack("!I", 5) + b"N" + struct.pack("!h", 1) + b"b"
     + struct.pack("!i", 1) + b"a", "binary"),
    (b"I" + struct.pack("!I", 5) + b"N" + struct.pack("!h", 1) + b"q", "kind 'q'"),
    (b"B" + b"\0" * 5, "truncated"),
    (b"R" + struct.pack("!I", 1) + b"no-terminator", "unterminated"),
])
def test_malformed_messages_are_decode_errors(payload: bytes, text: str) -> None:
    with pytest.raises(pgo.DecodeError, match=text):
        pgo.decode(payload)


def test_value_mapping() -> None:
    reg = TypeRegistry()

    def conv(oid: int, text: str) -> object:
        return reg.get(oid).convert(text)

    assert conv(23, "-12") == -12 and conv(20, "9007199254740993") == 9007199254740993
    assert conv(701, "1.5") == 1.5 and conv(701, "NaN") == "NaN"
    assert conv(1700, "12345678901234567890.000001") == "12345678901234567890.000001"
    assert TypeRegistry(numeric_as_number=True).get(1700).convert("2.50") == 2.5
    assert TypeRegistry(numeric_as_number=True).get(1700).convert("7") == 7
    assert conv(16, "t") is True and conv(16, "f") is False
    assert conv(3802, '{"a": [1, null]}') == {"a": [1, None]}
    assert conv(17, "\\x00ff10") == base64.b64encode(b"\x00\xff\x10").decode()
    assert conv(1184, "2024-05-01 12:00:00.5+00") == "2024-05-01T12:00:00.5+00:00"
    assert conv(1184, "2024-05-01 12:00:00+05:30") == "2024-05-01T12:00:00+05:30"
    assert conv(1114, "2024-05-01 12:00:00") == "2024-05-01T12:00:00"
    assert conv(1184, "infinity") == "infinity"
    assert conv(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11") == \
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert conv(1007, "{1,NULL,3}") == [1, None, 3]
    assert conv(1009, '{"a b","c\\"d",NULL,"NULL",plain}') == ["a b", 'c"d', None, "NULL",
                                                               "plain"]
    assert conv(1007, "{{1,2},{3,4}}") == [[1, 2], [3, 4]]
    assert conv(1007, "[0:1]={7,8}") == [7, 8]
    assert conv(1007, "{}") == []
    assert conv(3807, '{"{\\"a\\": 1}"}') == [{"a": 1}]
    assert reg.get(424242).name == "oid:424242" and reg.get(424242).convert("x") == "x"


def test_registry_domains_arrays_and_announced_types() -> None:
    reg = TypeRegistry()
    reg.load([(90001, "positive", "N", 0, 23), (90002, "_positive", "A", 90001, 0)])
    assert reg.get(90001).name == "positive" and reg.get(90001).convert("5") == 5
    assert reg.get(90002).convert("{5,6}") == [5, 6]
    reg.add(90003, "app", "mood")
    assert reg.get(90003).name == "app.mood" and reg.get(90003).convert("happy") == "happy"


def test_array_parser_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_array("1,2", int)
    with pytest.raises(ValueError):
        parse_array("{1,2} x", int)
