"""``compress``: compress each payload with gzip, zstd, lz4 or snappy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from pydantic import Field, model_validator

from connector import Message, PluginConfig, Rejected, Transform

from ._codecs import LEVELS, Algorithm, compressor

_IDENTITY = "identity"


class CompressConfig(PluginConfig):
    algorithm: Algorithm = Field(description="gzip, zstd, lz4 or snappy (framed formats)")
    level: int | None = Field(
        None, description="compression level: gzip 0..9 (default 6), zstd 1..22 (default 3), "
        "lz4 0..12 (default 0, its fast mode; 3 and up are high compression); snappy has none")
    header: str | None = Field(
        "Content-Encoding", description="header naming the algorithm on each compressed "
        "message (decompress with algorithm: auto reads it); null for none. A message that "
        "already has it (other than 'identity') is passed on unchanged")

    @model_validator(mode="after")
    def _check(self) -> Self:
        levels = LEVELS[self.algorithm]
        if self.level is not None:
            if levels is None:
                raise ValueError(f"{self.algorithm} takes no level")
            low, high, _ = levels
            if not low <= self.level <= high:
                raise ValueError(f"level: {self.algorithm} takes {low}..{high}, found "
                                 f"{self.level}")
        return self


class Compress(Transform[CompressConfig]):
    """Compresses each payload with gzip, zstd, lz4 or snappy (sets Content-Encoding)."""

    Config = CompressConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._compress = compressor(self.config.algorithm, self.config.level)

    def process(self, messages: list[Message]) -> Sequence[Message | Rejected]:
        compress, header, name = self._compress, self.config.header, self.config.algorithm
        out: list[Message | Rejected] = []
        append = out.append
        for m in messages:
            headers = m.headers
            if header is not None:
                present = headers.get(header)
                if present is not None and present.strip().lower() != _IDENTITY:
                    append(m)  # compressed already: compressing twice helps no one
                    continue
                headers = dict(headers)
                headers[header] = name
            append(Message(compress(m.data), m.subject, m.key, headers, m.timestamp, m.id))
        return out
