"""The initial snapshot of ``postgres_cdc`` (``snapshot: true``).

The rows every published table holds at the slot's **consistent point**, read
in one ``REPEATABLE READ`` transaction that imports the snapshot the slot's
creation exported (``SET TRANSACTION SNAPSHOT``), so that the rows read plus
the changes streamed from the slot afterwards are every change exactly once:
nothing committed before the point is streamed, nothing committed after it is
in the rows.

PostgreSQL keeps an exported snapshot importable only while the replication
connection that made it runs no other command: the source imports it at once
and starts replication on that connection only after the last row was read.

Rows are read per table in key order (the primary key, else the replica
identity index; a table with neither in physical order) through a cursor, a
batch at a time, as text (the session runs with the same ``DateStyle``,
``TimeZone``, ``IntervalStyle``, ``extra_float_digits`` and ``bytea_output`` as
the replication session, so each value has the text pgoutput would send and is
converted by the same rules). The publication's column lists and row filters
(PostgreSQL 15) are applied as pgoutput applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from . import pgoutput as pgo
from .connection import quote_ident

SESSION = {"DateStyle": "ISO", "TimeZone": "UTC", "IntervalStyle": "iso_8601",
           "extra_float_digits": "3", "bytea_output": "hex"}


@dataclass(slots=True)
class Table:
    """One published table to read: its relation (columns, key flags as pgoutput
    sets them), the query, and the columns naming a row in its id."""

    relation: pgo.Relation
    query: str
    id_columns: list[int]  # indexes into the relation's columns; [] -> ctid


@dataclass(slots=True)
class Progress:
    tables: list[Table]
    index: int = 0
    cursor: Any = None  # asyncpg cursor of tables[index], once opened
    rows: int = 0
    per_table: dict[str, int] = field(default_factory=dict)


async def begin(conn: asyncpg.Connection, snapshot_name: str) -> None:
    """Session settings, then the transaction that imports ``snapshot_name``."""
    for name, value in SESSION.items():
        await conn.execute(f"SET {name} = '{value}'")
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot_name}'")


async def published_tables(conn: asyncpg.Connection, publication: str) -> list[Table]:
    """The publication's tables as of the imported snapshot, with their columns."""
    rows = await conn.fetch("""
        SELECT c.oid::int8 AS oid, n.nspname, c.relname, c.relkind::text,
               c.relreplident::text AS ident, to_jsonb(pt) AS pt
        FROM pg_publication_tables pt
        JOIN pg_namespace n ON n.nspname = pt.schemaname
        JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
        WHERE pt.pubname = $1 ORDER BY 2, 3""", publication)
    out: list[Table] = []
    for r in rows:
        pt = orjson.loads(r["pt"])
        attnames = pt.get("attnames")  # PostgreSQL 15: the column list (or every column)
        rowfilter = pt.get("rowfilter")
        cols = await conn.fetch("""
            SELECT attname, atttypid::int8, atttypmod FROM pg_attribute
            WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
            ORDER BY attnum""", r["oid"])
        if attnames is not None:
            cols = [c for c in cols if c["attname"] in attnames]
        ident = r["ident"]
        # the key pgoutput marks: the replica identity index's columns (the primary
        # key by default), every column with FULL, none with NOTHING
        key_rows = await conn.fetch("""
            SELECT a.attname, i.indisprimary FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
            WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident)
            ORDER BY i.indisprimary DESC, array_position(i.indkey::int2[], a.attnum)""",
                                  r["oid"])
        primary = [k["attname"] for k in key_rows if k["indisprimary"]]
        replident = [k["attname"] for k in key_rows if not k["indisprimary"]]
        names = [c["attname"] for c in cols]
        if ident == "f":
            marked = set(names)
        elif ident == "i":
            marked = set(replident)
        elif ident == "d":
            marked = set(primary)
        else:
            marked = set()
        relation = pgo.Relation(
            int(r["oid"]), r["nspname"], r["relname"], ident,
            [pgo.Column(c["attname"], int(c["atttypid"]), int(c["atttypmod"]),
                        c["attname"] in marked) for c in cols])
        order = primary or replident
        order = order if all(k in names for k in order) else []
        select = ", ".join(["xmin::text", "ctid::text",
                            *(f"{quote_ident(n)}::text" for n in names)])
        only = "" if r["relkind"] == "p" else "ONLY "
        # ORDER BY names the table's columns through the alias: bare, they would be
        # the select list's text casts of the same name, sorted as text
        query = (f"SELECT {select} FROM {only}{quote_ident(r['nspname'])}."
                 f"{quote_ident(r['relname'])} AS t")
        if rowfilter:
            query += f" WHERE {rowfilter}"
        if order:
            query += " ORDER BY " + ", ".join(f"t.{quote_ident(k)}" for k in order)
        out.append(Table(relation, query, [names.index(k) for k in order]))
    return out
