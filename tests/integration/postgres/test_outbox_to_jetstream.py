"""Issue 5's must-show for the outbox: rows inserted by concurrent writers while
two ``natsconn run`` processes drain the same outbox table into JetStream are
all delivered, once each.

The JetStream sink runs with ``dedupe: false``: a row sent twice would show as
a second message in the stream instead of being dropped by Nats-Msg-Id.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from ..helpers import (
    create_stream,
    natsconn_process,
    pipeline_file,
    read_stream,
    stream_count,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

WRITERS, PER_WRITER, PER_TX = 4, 2500, 25


async def _writer(dsn: str, table: str, channel: str, w: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for first in range(0, PER_WRITER, PER_TX):
            async with conn.transaction():
                await conn.executemany(
                    f'INSERT INTO "{table}" (subject, headers, data) VALUES ($1, $2, $3)',
                    [(f"orders.w{w}", json.dumps({"Writer": str(w)}),
                      json.dumps({"w": w, "n": n}).encode())
                     for n in range(first, first + PER_TX)])
                await conn.execute("SELECT pg_notify($1, '')", channel)
            await asyncio.sleep(0.005)  # spread the writes over the run
    finally:
        await conn.close()


async def test_outbox_two_processes_concurrent_writers_all_once(
        nc: NATS, nats_url: str, postgres_dsn: str, db: asyncpg.Connection, unique: str,
        tables: Any, tmp_path: Path) -> None:
    table, stream, channel = tables("outbox"), f"PGOB_{unique}", f"outbox_{unique}"
    await db.execute(f"""CREATE TABLE "{table}" (
        id bigserial PRIMARY KEY, subject text, key bytea, headers jsonb,
        data bytea NOT NULL, claimed_until timestamptz)""")
    await create_stream(nc, stream, [f"pgob.{unique}.>"])
    pipeline = f"pgob-{unique}"
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "postgres_outbox", "dsn": postgres_dsn, "table": table,
                   "notify_channel": channel, "poll_interval": "500ms", "lease": "10s"},
        "sink": {"type": "jetstream", "servers": [nats_url], "stream": stream,
                 "subject": f"pgob.{unique}.{{subject[1]}}", "dedupe": False},
        "batch": {"max_messages": 200, "max_wait": "10ms"},
    }])
    total = WRITERS * PER_WRITER
    async with natsconn_process(file, log_name="a.log") as a, \
            natsconn_process(file, log_name="b.log") as b:
        await asyncio.gather(*(_writer(postgres_dsn, table, channel, w)
                               for w in range(WRITERS)))
        left = -1

        async def drained() -> bool:
            nonlocal left
            left = int(await db.fetchval(f'SELECT count(*) FROM "{table}"'))
            return left == 0 and await stream_count(nc, stream) >= total

        try:
            await wait_until(drained, 120, f"{total} rows sent and deleted", 0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {left} rows left, "
                                 f"{await stream_count(nc, stream)} in the stream") from None
        await asyncio.sleep(2.0)  # a late double send would show now
        sent_a = await a.metric("natsconn_messages_out_total", pipeline)
        sent_b = await b.metric("natsconn_messages_out_total", pipeline)
    messages = await read_stream(nc, stream)
    keys = [(json.loads(m.data)["w"], json.loads(m.data)["n"]) for m in messages]
    assert len(keys) == total and set(keys) == {(w, n) for w in range(WRITERS)
                                                for n in range(PER_WRITER)}, (
        f"{len(keys)} messages, {len(set(keys))} distinct, for {total} rows")
    for m in messages:
        writer = json.loads(m.data)["w"]
        assert m.subject == f"pgob.{unique}.w{writer}"
        assert (m.headers or {}).get("Writer") == str(writer)
    assert sent_a > 0 and sent_b > 0, f"one process did all the work ({sent_a}, {sent_b})"
    assert sent_a + sent_b == total
    print(f"\n[outbox] {total} rows from {WRITERS} writers: process A sent {sent_a:.0f}, "
          f"B sent {sent_b:.0f}; stream holds {len(keys)}, each once")
