"""The ``redis_stream`` source: one or more streams read with a consumer group.

Delivery is at least once. An entry is read with XREADGROUP (COUNT and BLOCK
from the engine's batch policy) and acknowledged with XACK only once the sink
confirmed it. An ack returns at once: one XACK pipeline at a time carries
every batch acknowledged meanwhile (a sink batch settles many reads).

Entries that stay pending are taken back, so nothing read is lost when a
replica dies:

* at start, this consumer's own pending entries (left by a crashed run under
  the same consumer name) are claimed and delivered before anything new;
* every ``claim_interval``, pending entries of any consumer idle for at least
  ``min_idle_time`` are claimed (XPENDING with IDLE, then XCLAIM with the same
  min idle time, so that two replicas never claim the same entry). This is
  XAUTOCLAIM's job, done in two steps because XAUTOCLAIM does not report how
  often an entry was delivered, which ``max_deliveries`` needs;
* ``nack`` sets the entries' idle time so that they become claimable after the
  nack's delay (XCLAIM ... IDLE); ``in_progress`` resets it (XCLAIM ... JUSTID,
  which does not count as a delivery) so that a long write is not taken over;
* the source itself does the same every third of ``min_idle_time`` for every
  entry it holds and has not settled (handed to the engine, or read and not yet
  handed out), so a stalled sink never leaves one idle long enough for another
  replica to claim it, whatever the pipeline's ``in_progress_interval``.

An entry already delivered ``max_deliveries`` times is not delivered again: it
is copied to ``dead_letter_stream`` with headers saying why and acknowledged,
by one Lua script per entry (the XACK runs only if the XADD succeeded). The
engine's own dead-letter target only sees what a sink rejects; this limit
catches entries that never reach a verdict (the process crashes on them, or
the write never ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from pydantic import Field, field_validator, model_validator
from redis.exceptions import ResponseError

from connector import Batch, ConnectorError, Duration, Message, PluginConfig, RetryableError, Source

from .acks import AckQueue
from .connection import RedisConnectionConfig, RedisLink, open_link, read_error, same_slot
from .fields import EntryDecoder, FieldMapping

DELIVERY_COUNT = "Natsconn-Delivery-Count"
# KEYS: dead-letter stream, source stream. ARGV: group, entry id, fields...
# An error in XADD ends the script before the XACK.
_MOVE = """
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
"""
_ID = re.compile(r"^(\$|\d+(-\d+)?)$")
_Ids = dict[str, list[bytes]]


class RedisStreamSourceConfig(RedisConnectionConfig, FieldMapping):
    streams: list[str] = Field(min_length=1, description="stream keys, read together")
    group: str | None = Field(None, description="consumer group shared by replicas; "
                              "default natsconn-<pipeline>")
    consumer: str | None = Field(None, description="this replica's consumer name; default "
                                 "the instance (host or pod) name")
    create_group: bool = Field(True, description="create the group (and an empty stream) "
                               "when missing; false: a missing group is an error")
    start_id: str = Field("0", description="where a new group starts: 0 the whole stream, "
                          "$ only new entries, or an entry id")
    min_idle_time: Duration = Field(60.0, gt=0, description="a pending entry idle this long "
                                    "is taken over from its consumer")
    claim_interval: Duration = Field(10.0, gt=0, description="how often to look for such "
                                     "entries")
    max_deliveries: int = Field(10, ge=0, description="deliveries before an entry goes to "
                                "dead_letter_stream; 0: no limit")
    dead_letter_stream: str = Field("{stream}:dead-letter", min_length=1, description=
                                    "where over-delivered entries go; {stream} is the "
                                    "entry's stream")

    @field_validator("start_id")
    @classmethod
    def _start_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(f"expected 0, $ or an entry id such as 1700000000000-0, "
                             f"found {value!r}")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> RedisStreamSourceConfig:
        if len(set(self.streams)) != len(self.streams):
            raise ValueError("streams are listed twice")
        if self.cluster:
            # One XREADGROUP reads every stream: in a cluster they need one slot. The
            # dead-letter script writes the copy and acknowledges the entry together.
            if not same_slot(*self.streams):
                raise ValueError(
                    "cluster: the streams are read by one XREADGROUP, so they must hash "
                    "to one slot: give them one {hash tag}, e.g. '{orders}:eu' and "
                    f"'{{orders}}:us' (found {self.streams})")
            for stream in self.streams:
                target = self.dead_letter_stream.replace("{stream}", stream)
                if self.max_deliveries and not same_slot(stream, target):
                    raise ValueError(
                        f"cluster: dead_letter_stream {target!r} and stream {stream!r} "
                        "must hash to one slot (one script moves the entry): put the "
                        "stream's name in a {hash tag}, e.g. '{orders}', whose default "
                        "dead-letter stream is '{orders}:dead-letter'")
        return self


class StreamAck:
    """The ack handle of one batch: its entry ids, per stream."""

    __slots__ = ("_ids", "_source")

    def __init__(self, source: RedisStreamSource, ids: _Ids) -> None:
        self._source = source
        self._ids = ids

    async def ack(self) -> None:
        await self._source._ack(self._ids)

    async def nack(self, delay: float | None = None) -> None:
        await self._source._nack(self._ids, delay or 0.0)

    async def term(self, reason: str) -> None:
        # The engine has logged why; the entries must not come again.
        await self._source._ack(self._ids)

    async def in_progress(self) -> None:
        await self._source._touch(self._ids)


class RedisStreamSource(Source[RedisStreamSourceConfig]):
    """Redis streams through a consumer group; XACK after the sink confirmed."""

    Config = RedisStreamSourceConfig

    @classmethod
    def shareable(cls, config: PluginConfig) -> bool:
        """Replicas share the consumer group, each with its own consumer name."""
        return True

    async def connect(self) -> None:
        cfg = self.config
        self._group = cfg.group or f"natsconn-{self.context.pipeline}"
        self._consumer = cfg.consumer or self.context.instance
        self._decoder = EntryDecoder(cfg)
        self._names = {s.encode(): s for s in cfg.streams}
        self._ready: deque[tuple[str, bytes, Message]] = deque()
        self._in_flight: set[tuple[str, bytes]] = set()
        # acknowledged, XACK not sent yet: (stream, entry ids) per batch, see acks.py
        self._acks: AckQueue[tuple[str, list[bytes]]] = AckQueue(
            self._send_acks, "redis-stream-xack", self.context.logger)
        self._own: dict[str, str] = {s: "-" for s in cfg.streams}  # start-up recovery
        self._stale: dict[str, str] = {}  # cursors of the current stale scan
        self._next_scan = 0.0
        self._min_idle_ms = max(1, int(cfg.min_idle_time * 1000))
        self._link: RedisLink = await open_link(cfg, self.context)
        self._r = self._link.client
        self._move_script = self._r.register_script(_MOVE)
        try:
            for stream in cfg.streams:
                await self._ensure_group(stream)
        except BaseException:
            await self._link.close()
            raise
        self._keeper = asyncio.create_task(self._keep_held_alive(),
                                           name="redis-stream-keep-alive")

    async def _keep_held_alive(self) -> None:
        """Every third of ``min_idle_time``: reset the idle time of every entry held
        and not settled (XCLAIM ... JUSTID to this consumer), so that no other
        consumer's scan finds it idle while its batch is still being written."""
        every = max(self.config.min_idle_time / 3, 0.05)
        while True:
            await asyncio.sleep(every)
            ids: _Ids = {}
            for stream, entry_id in self._in_flight:
                ids.setdefault(stream, []).append(entry_id)
            for stream, entry_id, _ in self._ready:
                ids.setdefault(stream, []).append(entry_id)
            if not ids:
                continue
            try:
                await self._set_idle(ids, 0)
            except Exception as exc:  # the next round tries again
                self.context.logger.debug("redis: keeping %d held entries: %s",
                                          sum(map(len, ids.values())), exc)

    async def _ensure_group(self, stream: str) -> None:
        cfg = self.config
        if not cfg.create_group:
            try:
                async with self._link.deadline():
                    groups = await self._r.xinfo_groups(stream)
            except ResponseError:
                groups = []
            except Exception as exc:
                raise read_error(self._link, exc, f"looking up group {self._group!r}") from None
            if not any(g["name"] == self._group.encode() for g in groups):
                raise ConnectorError(
                    f"redis at {self._link.where}: stream {stream!r} has no consumer group "
                    f"{self._group!r}; create it, or set create_group: true")
            return
        try:
            async with self._link.deadline():
                await self._r.xgroup_create(stream, self._group, id=cfg.start_id,
                                            mkstream=True)
            self.context.logger.info("created consumer group %s on stream %s at %s",
                                     self._group, stream, cfg.start_id)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise read_error(self._link, exc,
                                 f"creating group {self._group!r} on {stream!r}") from None
        except Exception as exc:
            raise read_error(self._link, exc, f"creating group {self._group!r}") from None

    # -- reading ----------------------------------------------------------------

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        try:
            if not self._ready:
                await self._recover(max_messages)
            if self._ready:
                batch: Batch | None = self._batch(self._take_ready(max_messages))
            else:
                batch = await self._read_new(max_messages, max_wait)
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP") and self.config.create_group:
                self.context.logger.warning("redis: %s; creating the group again", exc)
                for stream in self.config.streams:
                    await self._ensure_group(stream)
                raise RetryableError(f"consumer group {self._group!r} was missing") from None
            raise read_error(self._link, exc, "reading") from None
        except ConnectorError:
            raise
        except Exception as exc:
            raise read_error(self._link, exc, "reading") from None
        self._link.restored()
        return batch

    async def _read_new(self, max_messages: int, max_wait: float) -> Batch | None:
        args: list[Any] = ["XREADGROUP", "GROUP", self._group, self._consumer,
                           "COUNT", max_messages]
        block = 0.0
        if max_wait > 0:
            block = max(1, int(max_wait * 1000))
            args += ("BLOCK", block)
        args.append("STREAMS")
        args += self.config.streams
        args += [">"] * len(self.config.streams)
        async with self._link.deadline(block / 1000):
            reply: Any = await self._r.execute_command(*args)  # type: ignore[no-untyped-call]
        if not reply:
            return None
        decode = self._decoder.message
        in_flight = self._in_flight
        messages: list[Message] = []
        ids: _Ids = {}
        for raw_stream, entries in reply:
            stream = self._names.get(raw_stream) or raw_stream.decode()
            stream_ids = ids.setdefault(stream, [])
            for entry_id, fields in entries:
                message = decode(fields or {}, stream, entry_id.decode())
                if len(messages) >= max_messages:
                    # COUNT is per stream: what is over the batch is handed out next.
                    self._ready.append((stream, entry_id, message))
                    continue
                stream_ids.append(entry_id)
                in_flight.add((stream, entry_id))
                messages.append(message)
        if not messages:
            return None
        return Batch(messages, StreamAck(self, {s: i for s, i in ids.items() if i}))

    def _take_ready(self, n: int) -> list[tuple[str, bytes, Message]]:
        ready = self._ready
        return [ready.popleft() for _ in range(min(n, len(ready)))]

    def _batch(self, items: list[tuple[str, bytes, Message]]) -> Batch:
        ids: _Ids = {}
        for stream, entry_id, _ in items:
            ids.setdefault(stream, []).append(entry_id)
            self._in_flight.add((stream, entry_id))
        return Batch([m for _, _, m in items], StreamAck(self, ids))

    # -- taking back pending entries ---------------------------------------------

    async def _recover(self, n: int) -> None:
        """Fill ``_ready`` with pending entries to deliver again, if there are any."""
        r, group, deadline = self._r, self._group, self._link.deadline
        for stream, cursor in list(self._own.items()):
            async with deadline():
                pending = await r.xpending_range(stream, group, cursor, "+", n,
                                                 consumername=self._consumer)
            self._advance(self._own, stream, pending, n)
            await self._claim(stream, pending, 0)
            if self._ready:
                return
        now = time.monotonic()
        if not self._stale and now >= self._next_scan:
            self._next_scan = now + self.config.claim_interval
            self._stale = {s: "-" for s in self.config.streams}
            await self._report_lag()
        for stream, cursor in list(self._stale.items()):
            async with deadline():
                pending = await r.xpending_range(stream, group, cursor, "+", n,
                                                 idle=self._min_idle_ms)
            self._advance(self._stale, stream, pending, n)
            await self._claim(stream, pending, self._min_idle_ms)
            if self._ready:
                return

    @staticmethod
    def _advance(cursors: dict[str, str], stream: str, pending: list[dict[str, Any]],
                 n: int) -> None:
        if len(pending) < n:
            del cursors[stream]
        else:
            cursors[stream] = "(" + pending[-1]["message_id"].decode()

    async def _claim(self, stream: str, pending: list[dict[str, Any]], min_idle_ms: int) -> None:
        """XCLAIM ``pending`` (XPENDING rows) for this consumer; deliver or dead-letter."""
        me = self._consumer.encode()
        counts = {
            p["message_id"]: p["times_delivered"] for p in pending
            if not (p["consumer"] == me and (stream, p["message_id"]) in self._in_flight)
        }
        if not counts:
            return
        async with self._link.deadline():
            claimed: Any = await self._r.xclaim(stream, self._group, self._consumer,
                                                min_idle_ms, list[Any](counts))
        limit = self.config.max_deliveries
        poison: list[tuple[bytes, dict[bytes, bytes], int]] = []
        gone: list[bytes] = []
        decode = self._decoder.message
        for entry_id, fields in claimed:
            if fields is None:  # deleted meanwhile (Redis before 7.0 still lists it)
                gone.append(entry_id)
                continue
            deliveries = counts.get(entry_id, 0) + 1
            if limit and deliveries > limit:
                poison.append((entry_id, fields, deliveries - 1))
                continue
            message = decode(fields, stream, entry_id.decode(),
                             {DELIVERY_COUNT: str(deliveries)})
            self._ready.append((stream, entry_id, message))
        if gone:
            async with self._link.deadline():
                await self._r.xack(stream, self._group, *gone)
        if poison:
            await self._dead_letter(stream, poison)
        if claimed:
            self.context.logger.info("redis: claimed %d pending entries of %s (%d to deliver "
                                     "again, %d over max_deliveries)", len(claimed), stream,
                                     len(claimed) - len(poison) - len(gone), len(poison))

    async def _dead_letter(self, stream: str,
                           poison: list[tuple[bytes, dict[bytes, bytes], int]]) -> None:
        """Copy each entry to the dead-letter stream, then XACK it, in one script per
        entry: if the XADD fails (wrong type, no permission) the XACK does not run
        and the entry stays pending, to be tried again at the next scan."""
        cfg = self.config
        target = cfg.dead_letter_stream.replace("{stream}", stream)
        p = cfg.header_prefix
        # A cluster client cannot pipeline scripts: there the calls go one by one.
        pipe = None if self._link.cluster else self._r.pipeline(transaction=False)
        results: list[Any] = []
        for entry_id, fields, delivered in poison:
            values: list[Any] = _flatten(fields.items())
            values += (
                p + "Natsconn-Error", f"delivered {delivered} times without a verdict "
                f"(max_deliveries {cfg.max_deliveries})",
                p + "Natsconn-Error-Kind", "max_deliveries",
                p + "Natsconn-Attempts", str(delivered),
                p + "Natsconn-Pipeline", self.context.pipeline,
                p + "Natsconn-Original-Subject", stream,
                p + "Natsconn-Source-Id", f"{stream}:{entry_id.decode()}",
            )
            if pipe is not None:
                await self._move_script(keys=[target, stream],
                                        args=[self._group, entry_id, *values], client=pipe)
                continue
            try:
                async with self._link.deadline():
                    results.append(await self._move_script(
                        keys=[target, stream], args=[self._group, entry_id, *values]))
            except ResponseError as exc:
                results.append(exc)
        if pipe is not None:
            async with self._link.deadline():  # SCRIPT EXISTS/LOAD, then the pipeline
                results = await pipe.execute(raise_on_error=False)
        failed = [r for r in results if isinstance(r, Exception)]
        moved = len(poison) - len(failed)
        if moved:
            self.context.logger.warning(
                "redis: %d entries of stream %s were delivered %d times or more without a "
                "verdict; moved to %s", moved, stream, cfg.max_deliveries, target,
                extra={"pipeline": self.context.pipeline})
        if failed:
            self.context.logger.error(
                "redis: %d entries of stream %s are over max_deliveries but could not be "
                "moved to %s (they stay pending and are tried again): %s", len(failed),
                stream, target, failed[0], extra={"pipeline": self.context.pipeline})

    async def _report_lag(self) -> None:
        """Entries not yet delivered to the group (XINFO GROUPS lag), summed."""
        total = 0
        group = self._group.encode()
        for stream in self.config.streams:
            async with self._link.deadline():
                infos = await self._r.xinfo_groups(stream)
            for info in infos:
                if info.get("name") == group and isinstance(info.get("lag"), int):
                    total += info["lag"]
        self.context.meters.lag(total)

    # -- acknowledging ----------------------------------------------------------

    def _settled(self, ids: _Ids) -> None:
        in_flight = self._in_flight
        for stream, entry_ids in ids.items():
            for entry_id in entry_ids:
                in_flight.discard((stream, entry_id))

    async def _ack(self, ids: _Ids) -> None:
        """Queue the entries for the next XACK and return (see acks.py). An XACK
        that fails leaves its entries pending; they are claimed again after
        ``min_idle_time`` (at least once), as when the process dies before
        acknowledging."""
        self._acks.add(ids.items())

    async def _send_acks(self, lot: list[tuple[str, list[bytes]]]) -> None:
        ids: _Ids = {}
        for stream, entry_ids in lot:
            ids.setdefault(stream, []).extend(entry_ids)
        try:
            pipe = self._r.pipeline(transaction=False)
            for stream, entry_ids in ids.items():
                pipe.execute_command("XACK", stream, self._group, *entry_ids)
            async with self._link.deadline():
                await pipe.execute()
        except Exception as exc:
            self.context.logger.warning(
                "redis: XACK of %d entries failed; they stay pending and are claimed "
                "again after min_idle_time: %s", sum(map(len, ids.values())),
                read_error(self._link, exc, "XACK"))
        finally:
            self._settled(ids)

    async def _nack(self, ids: _Ids, delay: float) -> None:
        """Make the entries claimable ``delay`` seconds from now, by anyone."""
        self._settled(ids)
        await self._set_idle(ids, max(0, self._min_idle_ms - int(delay * 1000)))

    async def _touch(self, ids: _Ids) -> None:
        """A long write is under way: reset the idle time so nobody takes over."""
        await self._set_idle(ids, 0)

    async def _set_idle(self, ids: _Ids, idle_ms: int) -> None:
        try:
            pipe = self._r.pipeline(transaction=False)
            for stream, entry_ids in ids.items():
                pipe.xclaim(stream, self._group, self._consumer, 0, list[Any](entry_ids),
                            idle=idle_ms, justid=True)
            async with self._link.deadline():
                await pipe.execute()
        except Exception as exc:
            raise read_error(self._link, exc, "XCLAIM") from None

    async def close(self) -> None:
        acks = getattr(self, "_acks", None)
        if acks is not None:
            await acks.flush(5.0)
        keeper = getattr(self, "_keeper", None)
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        link = getattr(self, "_link", None)
        if link is None:
            return
        if self._ready:
            # Claimed but never handed out: let anyone claim them at once.
            ids: _Ids = {}
            for stream, entry_id, _ in self._ready:
                ids.setdefault(stream, []).append(entry_id)
            self._ready.clear()
            with contextlib.suppress(Exception):
                await self._set_idle(ids, self._min_idle_ms)
        await link.close()


def _flatten(pairs: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    out: list[bytes] = []
    for name, value in pairs:
        out += (name, value)
    return out
