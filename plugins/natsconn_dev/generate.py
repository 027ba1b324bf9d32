"""The ``generate`` source: synthetic messages at a count and rate."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from itertools import repeat
from typing import Literal, Self

from pydantic import Field, model_validator

from connector import Batch, EndOfInput, Message, PluginConfig, Source

from . import orders


class GenerateConfig(PluginConfig):
    count: int | None = Field(None, ge=0, description="messages in all; unset for no end")
    rate: float | None = Field(None, gt=0, description="messages per second; unset for "
                               "as fast as the pipeline takes them")
    size: int = Field(128, ge=12, le=64 * 1024 * 1024,
                      description="payload bytes; random: the first 12 are the sequence number")
    payload: Literal["random", "json"] = Field(
        "random", description="random: the sequence number's 12 digits, then random bytes; "
        "json: a JSON order record (order_id holding the sequence number, amount, currency, "
        f"region, customer, items; 10 fields from {orders.FULL_SIZE} bytes on) padded to "
        f"`size` (at least {orders.MIN_SIZE})")
    subject: str = Field("generated.{mod}", description="subject; {seq} is the sequence "
                         "number, {mod} the sequence number modulo `modulo`")
    modulo: int = Field(10, ge=1)
    key: str | None = Field(None, description="key template, same placeholders as subject")
    headers: dict[str, str] = Field(default_factory=dict)
    ids: bool = Field(True, description="give each message the id 'gen-<seq>'")

    @model_validator(mode="after")
    def _fits(self) -> Self:
        if self.payload == "json" and self.size < orders.MIN_SIZE:
            raise ValueError(f"payload json needs size >= {orders.MIN_SIZE}, found {self.size}")
        return self


class GenerateSource(Source[GenerateConfig]):
    """Synthetic messages: a count, a rate, a size; for tests and benchmarks."""

    Config = GenerateConfig

    async def connect(self) -> None:
        cfg = self.config
        self._seq = 0
        self._started = time.monotonic()
        self._filler = os.urandom(cfg.size - 12) if cfg.payload == "random" else b""
        self._tails = orders.tails(cfg.size) if cfg.payload == "json" else []
        self._subject_const = "{" not in cfg.subject
        # Only {mod} in the subject: the modulo's subjects, made once.
        self._subjects = ([cfg.subject.replace("{mod}", str(i)) for i in range(cfg.modulo)]
                          if "{mod}" in cfg.subject and "{seq}" not in cfg.subject else None)
        self._headers = dict(cfg.headers)

    def _subject(self, seq: int) -> str:
        cfg = self.config
        return cfg.subject.replace("{seq}", str(seq)).replace("{mod}", str(seq % cfg.modulo))

    async def read_batch(self, max_messages: int, max_wait: float) -> Batch | None:
        cfg = self.config
        n = max_messages
        if cfg.count is not None:
            n = min(n, cfg.count - self._seq)
            if n <= 0:
                raise EndOfInput("generated every message")
        if cfg.rate is not None:
            allowed = int((time.monotonic() - self._started) * cfg.rate) - self._seq
            if allowed <= 0:
                await asyncio.sleep(min(max_wait, 1.0 / cfg.rate))
                return None
            n = min(n, allowed)
        first = self._seq
        self._seq += n
        # Column by column, each a comprehension, then one map over the Message
        # constructor: this source is most of the engine benchmark's CPU
        # (generate -> drop), and a loop with a branch per field cost a third more.
        seqs = range(first, first + n)
        tails, pool = self._tails, len(self._tails)
        if pool:
            prefix = orders.PREFIX
            datas = [prefix + b"%012d" % seq + tails[seq % pool] for seq in seqs]
        else:
            filler = self._filler
            datas = [b"%012d" % seq + filler for seq in seqs]
        subjects, modulo = self._subjects, cfg.modulo
        if self._subject_const:
            subject: Iterable[str] = repeat(cfg.subject, n)
        elif subjects is not None:
            subject = [subjects[seq % modulo] for seq in seqs]
        else:
            subject = [self._subject(seq) for seq in seqs]
        key_tpl = cfg.key
        keys: Iterable[bytes | None] = repeat(None, n) if key_tpl is None else [
            key_tpl.replace("{seq}", str(seq)).replace("{mod}", str(seq % modulo)).encode()
            for seq in seqs]
        ids: Iterable[str | None] = ([f"gen-{seq}" for seq in seqs] if cfg.ids
                                     else repeat(None, n))
        messages = list(map(Message, datas, subject, keys, repeat(self._headers, n),
                            repeat(time.time(), n), ids))
        return Batch(messages)
