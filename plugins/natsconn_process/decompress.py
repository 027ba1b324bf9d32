"""``decompress``: undo gzip, zstd, lz4 or snappy, never beyond ``max_size`` bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

from pydantic import Field

from connector import ByteSize, Message, PluginConfig, Rejected, RejectedError, Transform

from ._codecs import ENCODINGS, Algorithm, Decompressor, sniff

_IDENTITY: Final = "identity"


class DecompressConfig(PluginConfig):
    algorithm: Literal["auto", "gzip", "zstd", "lz4", "snappy"] = Field(
        "auto", description="auto: the format the header names, else the one the data starts "
        "like (its magic number), else the message is passed on unchanged")
    max_size: ByteSize = Field(
        64 * 1024 * 1024, gt=0, description="largest decompressed payload; a larger one is "
        "rejected (guards against decompression bombs)")
    header: str | None = Field(
        "Content-Encoding", description="header naming the format (read by auto) and removed "
        "from each decompressed message; null for none")


class Decompress(Transform[DecompressConfig]):
    """Decompresses gzip, zstd, lz4 or snappy payloads (auto: by Content-Encoding or magic)."""

    Config = DecompressConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self._fixed: Algorithm | None = None if c.algorithm == "auto" else c.algorithm
        self._decompress = Decompressor(int(c.max_size))

    def process(self, messages: list[Message]) -> Sequence[Message | Rejected]:
        header, fixed, decompress = self.config.header, self._fixed, self._decompress
        out: list[Message | Rejected] = []
        append = out.append
        for m in messages:
            try:
                algorithm = fixed if fixed is not None else self._detect(m)
                if algorithm is None:
                    append(m)  # not compressed
                    continue
                data = decompress(algorithm, m.data)
            except RejectedError as exc:
                append(Rejected(m, f"decompress: {exc}"))
                continue
            headers = m.headers
            if header is not None and header in headers:
                headers = dict(headers)
                del headers[header]
            append(Message(data, m.subject, m.key, headers, m.timestamp, m.id))
        return out

    def _detect(self, m: Message) -> Algorithm | None:
        header = self.config.header
        named = m.headers.get(header) if header is not None else None
        if named is None:
            return sniff(m.data)
        token = named.strip().lower()
        if token == _IDENTITY:
            return None
        algorithm = ENCODINGS.get(token)
        if algorithm is None:
            raise RejectedError(f"unsupported {header} {named!r} (expected gzip, zstd, lz4, "
                                f"snappy or identity)")
        return algorithm
