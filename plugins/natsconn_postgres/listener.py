"""A LISTEN connection that comes back by itself.

asyncpg delivers notifications by callback on a dedicated connection. When
that connection is lost (server restart, network cut), or stops answering a
periodic ``SELECT 1``, it is replaced with doubling waits and every channel is
LISTENed again. Notifications sent while it was away are lost: PostgreSQL
keeps none for a session that is not there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from connector import PluginContext

from .connection import Backoff, PostgresConnectionConfig, open_connection


class Listener:
    def __init__(
        self,
        config: PostgresConnectionConfig,
        context: PluginContext,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        *,
        keepalive: float = 10.0,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._context = context
        self._channels = list(channels)
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._keepalive = keepalive
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    async def start(self) -> None:
        """Connect and LISTEN now (errors raise), then keep the connection alive."""
        await self._open()
        self._task = asyncio.create_task(self._watch(), name="natsconn-postgres-listen")

    def _callback(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._on_notify(channel, payload)

    def _terminated(self, conn: Any) -> None:
        if conn is self._conn:
            self._lost.set()

    async def _open(self) -> None:
        conn = await open_connection(self._config, self._context)
        try:
            for channel in self._channels:
                await conn.add_listener(channel, self._callback)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._terminated)
        self._conn = conn
        self._lost.clear()
        self.connected = True

    async def _alive(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        try:
            await conn.fetchval("SELECT 1", timeout=self._config.connect_timeout)
        except Exception:
            return False
        return True

    async def _watch(self) -> None:
        log, meters = self._context.logger, self._context.meters
        backoff = Backoff(self._config.reconnect_wait, self._config.reconnect_wait_max)
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._keepalive)
            if self._closed:
                return
            if not self._lost.is_set() and await self._alive():
                continue
            self.connected = False
            meters.disconnected()
            log.warning("postgres LISTEN connection lost; reconnecting (notifications sent "
                        "meanwhile are lost)")
            old, self._conn = self._conn, None
            if old is not None:
                old.terminate()
            while not self._closed:
                try:
                    await self._open()
                except Exception as exc:
                    wait = backoff.next()
                    log.warning("postgres LISTEN reconnect failed, next try in %.1fs: %s",
                                wait, exc)
                    await asyncio.sleep(wait)
                    continue
                backoff.reset()
                meters.reconnected()
                log.info("postgres LISTEN connection back on %s", ", ".join(self._channels))
                if self._on_reconnect is not None:
                    self._on_reconnect()
                break

    async def close(self) -> None:
        self._closed = True
        self._lost.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:
                conn.terminate()
