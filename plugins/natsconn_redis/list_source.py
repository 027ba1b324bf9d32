"""The ``redis_list`` source: a reliable queue on a Redis list.

Delivery is at least once. Each element is moved atomically from the queue
into this consumer's own processing list (LMOVE/BLMOVE), and removed from
there (LREM) only once the sink confirmed it. A batch is moved by one Lua
call, so a read costs one round trip; when the queue is empty the read blocks
on BLMOVE for at most the engine's wait. An ack returns at once: one LREM
pipeline at a time carries every batch acknowledged meanwhile (acks.py).

Nothing moved is lost:

* ``nack`` puts the batch's elements back at the front of the queue (the end
  that is popped), oldest first in line, at once (the delay is not honoured);
* at start, elements left in this consumer's processing list by an earlier
  run under the same name go back to the front of the queue, so they are the
  first read again;
* each consumer keeps a liveness key (``<processing list>:alive``, expiring
  after ``lease``) fresh while it runs. Every ``claim_interval`` the others
  look for processing lists whose liveness key is gone (a replica that died
  for good, a pod with a random name) and put their elements back, atomically.

Elements are payloads only: no headers, key or id. Two equal elements are
interchangeable: acknowledging one removes one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from typing import Any

from pydantic import Field, field_validator, model_validator

from connector import Batch, ConnectorError, Duration, Message, PluginConfig, Source

from .acks import AckQueue
from .connection import RedisConnectionConfig, RedisLink, open_link, read_error, same_slot
from .list_sink import Side

# KEYS: queue, processing. ARGV: count, side to pop. Moves up to count elements.
_MOVE_SOME = """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], ARGV[2], 'LEFT')
  if not v then break end
  out[i] = v
end
return out
"""
# KEYS: processing, queue, liveness key. ARGV: side to push, '1' to check liveness.
# Moves every element back, newest first, so the oldest ends up next in line.
_RETURN_ALL = """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', ARGV[1]) do n = n + 1 end
return n
"""
# KEYS: processing, queue. ARGV: side to push, then the elements, oldest first.
# Only elements still in the processing list go back (no duplicates).
_NACK = """
local n = 0
for i = #ARGV, 2, -1 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    if ARGV[1] == 'LEFT' then redis.call('LPUSH', KEYS[2], ARGV[i])
    else redis.call('RPUSH', KEYS[2], ARGV[i]) end
    n = n + 1
  end
end
return n
"""
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


class RedisListSourceConfig(RedisConnectionConfig):
    key: str = Field(min_length=1, description="the queue: a list key")
    consumer: str | None = Field(None, description="this replica's name; default the "
                                 "instance (host or pod) name")
    pop: Side = Field(Side.right, description="end of the queue to take from: right "
                      "pairs with producers that LPUSH (the redis_list sink's default)")
    processing_list: str = Field("{key}:processing:{consumer}", description="this "
                                 "consumer's processing list; must contain {consumer}")
    lease: Duration = Field(30.0, gt=0, description="a consumer silent this long is "
                            "presumed dead and its processing list recovered")
    recover_orphans: bool = Field(True, description="put back the elements of dead "
                                  "consumers' processing lists")
    claim_interval: Duration = Field(10.0, gt=0, description="how often to look for them")

    @field_validator("processing_list")
    @classmethod
    def _consumer_part(cls, value: str) -> str:
        if "{consumer}" not in value:
            raise ValueError("processing_list must contain {consumer}, so that each "
                             "replica has its own")
        return value

    @model_validator(mode="after")
    def _not_queue(self) -> RedisListSourceConfig:
        if self.processing_list.replace("{key}", self.key) == self.key:
            raise ValueError("processing_list must differ from key")
        if self.cluster:
            check_cluster_keys(self, "any-consumer")
        return self


def check_cluster_keys(cfg: RedisListSourceConfig, consumer: str) -> None:
    """In a cluster the queue, a processing list and its liveness key are used by
    one script (and BLMOVE) together: they must hash to one slot."""
    processing = (cfg.processing_list.replace("{key}", cfg.key)
                  .replace("{consumer}", consumer))
    if not same_slot(cfg.key, processing, processing + ":alive"):
        raise ValueError(
            f"cluster: the queue {cfg.key!r} and its processing list {processing!r} "
            "are moved between by one command, so they must hash to one slot: put a "
            "{hash tag} in key, e.g. '{jobs}' (the default processing list is then "
            "'{jobs}:processing:<consumer>')")


class ListAck:
    __slots__ = ("_source", "_values")

    def __init__(self, source: RedisListSource, values: list[bytes]) -> None:
        self._source = source
        self._values = values

    async def ack(self) -> None:
        await self._source._remove(self._values)

    async def nack(self, delay: float | None = None) -> None:
        await self._source._give_back(self._values)

    async def term(self, reason: str) -> None:
        await self._source._remove(self._values)  # the engine has logged why

    async def in_progress(self) -> None:
        return None


class RedisListSource(Source[RedisListSourceConfig]):
    """A Redis list as a reliable queue: BLMOVE, then LREM after the sink confirmed."""

    Config = RedisListSourceConfig

    @classmethod
    def shareable(cls, config: PluginConfig) -> bool:
        """BLMOVE hands each entry to one replica."""
        return True

    async def connect(self) -> None:
        cfg = self.config
        self._consumer = cfg.consumer or self.context.instance
        if cfg.cluster:
            try:  # the consumer's name is known only now
                check_cluster_keys(cfg, self._consumer)
            except ValueError as exc:
                raise ConnectorError(str(exc)) from None
        self._processing = self._list_name(self._consumer)
        self._alive = self._processing + ":alive"
        self._pop = cfg.pop.value.upper()
        self._link: RedisLink = await open_link(cfg, self.context)
        r = self._r = self._link.client
        self._move_some = r.register_script(_MOVE_SOME)
        self._return_all = r.register_script(_RETURN_ALL)
        self._nack_script = r.register_script(_NACK)
        self._acks: AckQueue[bytes] = AckQueue(self._send_removals, "redis-list-lrem",
                                               self.context.logger)
        try:
            await self._beat()
            async with self._link.deadline():
                back = await self._return_all(
                    keys=[self._processing, cfg.key, self._alive], args=[self._pop, "0"])
        except Exception as exc:
            await self._link.close()
            raise read_error(self._link, exc, f"recovering {self._processing!r}") from None
        if back:
            self.context.logger.warning(
                "redis: %d element(s) left in %s by an earlier run went back to the front "
                "of %s", back, self._processing, cfg.key)
        self._task: asyncio.Task[None] | None = asyncio.create_task(
            self._keep_alive(), name="redis-list-lease")

    def _list_name(self, consumer: str) -> str:
        return (self.config.processing_list.replace("{key}", self.config.key)
                .replace("{consumer}", consumer))

    # -- liveness and orphans ---------------------------------------------------

    async def _beat(self) -> None:
        async with self._link.deadline():
            await self._r.set(self._alive, self._consumer,
                              px=max(1, int(self.config.lease * 1000)))

    async def _keep_alive(self) -> None:
        cfg = self.config
        beat_every = cfg.lease / 3
        loop = asyncio.get_running_loop()
        next_scan = loop.time() if cfg.recover_orphans else float("inf")
        while True:
            try:
                await self._beat()
                if loop.time() >= next_scan:
                    next_scan = loop.time() + cfg.claim_interval
                    await self._recover_orphans()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.context.logger.debug("redis list lease: %s", exc)
            await asyncio.sleep(min(beat_every, max(0.05, next_scan - loop.time())))

    async def _recover_orphans(self) -> None:
        cfg = self.config
        pattern = (cfg.processing_list.replace("{key}", _GLOB_SPECIAL.sub(r"\\\1", cfg.key))
                   .replace("{consumer}", "*"))
        # In a cluster the processing lists share the queue's slot, so its master
        # holds them all: SCAN that node (looked up each time: a failover moves it).
        where: dict[str, Any] = ({"target_nodes": self._r.get_node_from_key(cfg.key)}  # type: ignore[attr-defined]
                                 if self._link.cluster else {})
        cursor: int = 0
        while True:  # SCAN by hand: one deadline per round trip
            async with self._link.deadline():
                reply: Any = await self._r.scan(cursor, match=pattern, count=200,
                                                _type="list", **where)
            if self._link.cluster:  # ({node: cursor}, keys)
                cursor, found = next(iter(reply[0].values())), reply[1]
            else:
                cursor, found = reply
            for raw in found:
                await self._return_orphan(raw)
            if cursor == 0:
                return

    async def _return_orphan(self, raw: bytes | str) -> None:
        cfg = self.config
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if name == self._processing:
            return
        async with self._link.deadline():
            moved = await self._return_all(keys=[name, cfg.key, name + ":alive"],
                                           args=[self._pop, "1"])
        if isinstance(moved, int) and moved > 0:
            self.context.logger.warning(
                "redis: %d element(s) of %s, whose consumer is gone, went back to %s",
                moved, name, cfg.key)

    # -- reading ----------------------------------------------------------------

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        cfg = self.config
        keys = [cfg.key, self._processing]
        deadline = self._link.deadline
        try:
            async with deadline():
                values: list[bytes] = await self._move_some(keys=keys,
                                                            args=[max_messages, self._pop])
            if not values:
                if max_wait <= 0:
                    self._link.restored()
                    return None
                block = max(0.01, round(max_wait, 3))  # 0 would block for ever
                async with deadline(block):
                    first: Any = await self._r.execute_command(  # type: ignore[no-untyped-call]
                        "BLMOVE", cfg.key, self._processing, self._pop, "LEFT", block)
                if first is None:
                    self._link.restored()
                    return None
                values = [first]
                if max_messages > 1:
                    async with deadline():
                        values += await self._move_some(keys=keys,
                                                        args=[max_messages - 1, self._pop])
        except Exception as exc:
            raise read_error(self._link, exc, f"reading {cfg.key!r}") from None
        self._link.restored()
        key = cfg.key
        return Batch([Message(v, key) for v in values], ListAck(self, values))

    # -- acknowledging ----------------------------------------------------------

    async def _remove(self, values: Sequence[bytes]) -> None:
        """Queue the values for the next LREM pipeline and return (see acks.py)."""
        self._acks.add(values)

    async def _send_removals(self, values: list[bytes]) -> None:
        try:
            pipe = self._r.pipeline(transaction=False)
            for v in values:
                pipe.execute_command("LREM", self._processing, -1, v)
            async with self._link.deadline():
                await pipe.execute()
        except Exception as exc:
            # They stay in the processing list: the next start of this consumer, or
            # another's orphan scan once this one stops beating, puts them back.
            self.context.logger.warning(
                "redis: LREM of %d element(s) from %s failed; they stay there and go back "
                "to %s when this consumer restarts or is found dead: %s", len(values),
                self._processing, self.config.key,
                read_error(self._link, exc, f"LREM from {self._processing!r}"))

    async def _give_back(self, values: Sequence[bytes]) -> None:
        try:
            async with self._link.deadline():
                await self._nack_script(keys=[self._processing, self.config.key],
                                        args=[self._pop, *values])
        except Exception as exc:
            raise read_error(self._link, exc, f"returning to {self.config.key!r}") from None

    async def close(self) -> None:
        task = getattr(self, "_task", None)
        link = getattr(self, "_link", None)
        if task is None or link is None:
            return  # never connected, connect failed (and cleaned up), or closed
        self._task = None
        await self._acks.flush(5.0)  # before the processing list is given up
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            # Let the others recover at once whatever is still ours.
            async with self._link.deadline():
                if await self._r.llen(self._processing):
                    await self._r.delete(self._alive)
                else:
                    await self._r.delete(self._alive, self._processing)
        await link.close()
