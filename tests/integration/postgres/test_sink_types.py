"""A row with every type the ``postgres`` sink maps (each converter of
``natsconn_postgres.mapping``, an array, and a type it passes as text), against
the real server: good values arrive as the typed value; a value a column cannot
take is that message's rejection, naming the problem, and the batch's other
messages are written (issue 17: bad input everywhere). It found two faults: the
catalog read each type's category as bytes, so no column was known as an array
(a list went as its text), and ``unnest()`` flattened an array column in
``insert`` mode ("column is of type integer[] but expression is of type
integer", retried for ever)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from natsconn_postgres.sink import PostgresSink

from connector import Message, PartialWriteError, RejectedError

pytestmark = pytest.mark.integration

# column -> (SQL type, a good JSON value, what the database then holds, a bad value)
UID = uuid.uuid4()
TYPES: dict[str, tuple[str, Any, Any, Any]] = {
    "c_int2": ("smallint", 12, 12, 70000),
    "c_int4": ("integer", "123456", 123456, "12x"),
    "c_int8": ("bigint", 2 ** 40, 2 ** 40, 2 ** 70),
    "c_float4": ("real", 1.5, 1.5, "one"),
    "c_float8": ("double precision", "2.25", 2.25, [1]),
    "c_numeric": ("numeric(10,2)", 9.5, Decimal("9.50"), "nine"),
    "c_bool": ("boolean", "true", True, "maybe"),
    "c_tstz": ("timestamptz", "2024-05-01T12:00:00Z",
               dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC), "yesterday-ish"),
    "c_ts": ("timestamp", "2024-05-01T12:00:00", dt.datetime(2024, 5, 1, 12), "2024-13-01T00:00"),
    "c_date": ("date", "2024-02-29", dt.date(2024, 2, 29), "2023-02-29"),
    "c_uuid": ("uuid", str(UID), UID, "not-a-uuid"),
    "c_jsonb": ("jsonb", {"a": [1, 2]}, {"a": [1, 2]}, None),  # any JSON value fits
    "c_json": ("json", [1, "x"], [1, "x"], None),
    "c_bytea": ("bytea", "raw", b"raw", None),  # a JSON string: its UTF-8 bytes
    "c_text": ("text", "héllo", "héllo", None),
    "c_ints": ("integer[]", [1, 2, 3], [1, 2, 3], ["a"]),
    "c_inet": ("inet", "10.1.2.3", "10.1.2.3", "10.1.2.300"),  # passed as text
}


def _message(i: int, values: dict[str, Any]) -> Message:
    return Message(json.dumps(values).encode(), "t.types", None, {}, time.time(), f"T:{i}")


@pytest.mark.parametrize("mode", ["insert", "copy"])
async def test_every_mapped_type_good_and_bad(postgres_dsn: str, db: asyncpg.Connection,
                                              tables: Callable[[str], str], mode: str) -> None:
    table = tables(f"types_{mode}")
    cols = ", ".join(f'"{c}" {t}' for c, (t, _, _, _) in TYPES.items())
    await db.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY, {cols})')
    sink = PostgresSink.make_test_instance(
        dsn=postgres_dsn, table=table, mode=mode,
        columns={"id": "id", **{c: f"data.{c}" for c in TYPES}})
    await sink.connect()
    good = {c: v for c, (_, v, _, _) in TYPES.items()}
    bad_columns = [c for c, (_, _, _, b) in TYPES.items() if b is not None]
    messages = [_message(0, good)] + [
        _message(i + 1, {**good, c: TYPES[c][3]}) for i, c in enumerate(bad_columns)]
    try:
        with pytest.raises(PartialWriteError) as info:
            await sink.write_batch(messages)
    finally:
        await sink.close()
    failed = info.value.failed
    # exactly the bad ones, each a rejection (dead letter), never a retry
    assert set(failed) == set(range(1, len(messages))), failed
    for i, column in enumerate(bad_columns, start=1):
        assert isinstance(failed[i], RejectedError), (column, failed[i])
        assert str(failed[i]), column
    rows = await db.fetch(f'SELECT * FROM "{table}"')
    assert [r["id"] for r in rows] == ["T:0"]
    row = rows[0]
    for column, (_, _, held, _) in TYPES.items():
        value = row[column]
        if column in ("c_jsonb", "c_json"):
            value = json.loads(value)
        elif column == "c_inet":
            value = str(value)
        assert value == held, (column, value, held)
