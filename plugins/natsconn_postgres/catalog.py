"""What the database says about a table: its columns and types, its unique keys."""

from __future__ import annotations

from typing import Any

import asyncpg

from .connection import quote_table
from .mapping import TargetColumn

_COLUMNS = """
SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS sql_type,
       coalesce(bt.typname, t.typname) AS base_type,
       coalesce(bt.typcategory, t.typcategory)::text AS category  -- "char": bytes otherwise
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_UNIQUE = """
SELECT i.indkey::int2[] AS keys, i.indnkeyatts AS nkeys
FROM pg_index i
WHERE i.indrelid = $1::regclass AND i.indisunique AND i.indpred IS NULL
  AND i.indexprs IS NULL AND i.indisvalid
"""


async def table_exists(conn: asyncpg.Connection, table: str) -> bool:
    oid: Any = await conn.fetchval("SELECT to_regclass($1)::oid", quote_table(table))
    return oid is not None


async def columns(conn: asyncpg.Connection, table: str) -> dict[str, TargetColumn]:
    rows = await conn.fetch(_COLUMNS, quote_table(table))
    return {r["attname"]: TargetColumn(r["attname"], r["sql_type"], r["base_type"],
                                       r["category"]) for r in rows}


async def unique_keys(conn: asyncpg.Connection, table: str) -> list[frozenset[str]]:
    """Column sets of the plain unique indexes (what ON CONFLICT (cols) can use)."""
    names = {r["attnum"]: r["attname"] for r in await conn.fetch(_COLUMNS, quote_table(table))}
    out = []
    for r in await conn.fetch(_UNIQUE, quote_table(table)):
        keys = list(r["keys"])[: r["nkeys"]]
        if all(k in names for k in keys):
            out.append(frozenset(names[k] for k in keys))
    return out
