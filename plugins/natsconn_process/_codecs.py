"""The compression formats of ``compress``/``decompress``.

Each is the format's framed (streaming) form, the one other tools read:
gzip (RFC 1952), the zstd frame format, the LZ4 frame format, and the snappy
framing format (not raw snappy blocks). zstd and snappy go through cramjam.
gzip goes through the standard library's zlib: the same format, but about
ten times cheaper per call than cramjam's for the small payloads a message
bus carries, and its ``max_length`` bounds the output exactly. LZ4 frames
are put together here around cramjam's block compressor (_lz4.py), for the
same reason.

Decompression never produces more than ``max_size`` bytes: cramjam
decompresses into a bounded buffer (reused across messages, grown only for
the messages that need it), zlib stops at ``max_length``. A payload that
would expand beyond it, a decompression bomb, costs at most that much memory
and the work to fill it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, Final, Literal

import cramjam

from connector import RejectedError

from . import _lz4

Algorithm = Literal["gzip", "zstd", "lz4", "snappy"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("gzip", "zstd", "lz4", "snappy")

#: Levels each format takes, and the default used when none is given.
LEVELS: Final[dict[str, tuple[int, int, int] | None]] = {
    "gzip": (0, 9, 6),
    "zstd": (1, 22, 3),
    "lz4": (0, 12, 0),
    "snappy": None,
}

#: Content-Encoding tokens read (gzip and zstd are HTTP's own).
ENCODINGS: Final[dict[str, Algorithm]] = {
    "gzip": "gzip", "x-gzip": "gzip", "zstd": "zstd", "lz4": "lz4", "snappy": "snappy",
}

# How each format's data begins (for algorithm: auto without a header).
_MAGIC: Final[tuple[tuple[bytes, Algorithm], ...]] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"\xff\x06\x00\x00sNaPpY", "snappy"),
)

_GZIP_WBITS: Final = 31  # zlib's "gzip container" mode
_FIRST_BUFFER: Final = 256 * 1024
_KEEP_BUFFER: Final = 4 * 1024 * 1024  # larger buffers are dropped after the message
_GROWTH: Final = 8
_TOO_SMALL: Final = "failed to write whole buffer"  # cramjam: output beyond the buffer


class TooLarge(RejectedError):
    """The output would exceed ``max_size``."""


def sniff(data: bytes) -> Algorithm | None:
    """The format ``data`` starts like, if any."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def compressor(algorithm: Algorithm, level: int | None) -> Callable[[bytes], bytes]:
    """A function compressing one payload (``level`` None: the format's default)."""
    levels = LEVELS[algorithm]
    if levels is not None and level is None:
        level = levels[2]
    if algorithm == "gzip":
        gzip_level = level if level is not None else 6
        return lambda data: zlib.compress(data, gzip_level, _GZIP_WBITS)
    if algorithm == "lz4":
        return _lz4.compressor(level if level is not None else 0)
    module = getattr(cramjam, algorithm)
    if levels is None:
        return lambda data: bytes(module.compress(data))
    return lambda data: bytes(module.compress(data, level=level))


def size_text(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"


class Decompressor:
    """Decompresses payloads of every format, none beyond ``max_size`` bytes."""

    __slots__ = ("_buffer", "_into", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray(0)
        self._into: dict[str, Any] = {a: getattr(cramjam, a).decompress_into
                                      for a in ALGORITHMS if a != "gzip"}

    def __call__(self, algorithm: Algorithm, data: bytes) -> bytes:
        if algorithm == "gzip":
            return self._gunzip(data)
        if algorithm == "lz4":
            try:
                out, self._buffer = _lz4.read(data, self._buffer, self.max_size)
            except _lz4.TooLarge:
                raise self._too_large("lz4") from None
            if out is not None:
                return out
        return self._cramjam(algorithm, data)

    def _too_large(self, algorithm: str) -> TooLarge:
        return TooLarge(f"{algorithm} data expands beyond max_size "
                        f"({size_text(self.max_size)}); rejected as a possible "
                        "decompression bomb")

    def _gunzip(self, data: bytes) -> bytes:
        left = self.max_size + 1
        parts: list[bytes] = []
        rest = data
        try:
            while True:  # RFC 1952: a gzip file may be several members in a row
                d = zlib.decompressobj(_GZIP_WBITS)
                parts.append(d.decompress(rest, left))
                left -= len(parts[-1])
                if left <= 0 or d.unconsumed_tail:
                    raise self._too_large("gzip")
                if not d.eof:
                    raise RejectedError("data is not valid gzip: it ends before the "
                                        "compressed stream does")
                rest = d.unused_data
                if not rest:
                    break
        except zlib.error as exc:
            raise RejectedError(f"data is not valid gzip: {exc}") from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _cramjam(self, algorithm: str, data: bytes) -> bytes:
        cap = self.max_size
        into = self._into[algorithm]
        buffer = self._buffer
        if not buffer:
            buffer = self._buffer = bytearray(min(cap + 1, _FIRST_BUFFER))
        while True:
            try:
                n = into(data, buffer)
            except cramjam.DecompressionError as exc:
                if _TOO_SMALL not in str(exc):
                    raise RejectedError(f"data is not valid {algorithm}: {exc}") from None
                if len(buffer) > cap:
                    raise self._too_large(algorithm) from None
                buffer = bytearray(min(cap + 1, len(buffer) * _GROWTH))
                if len(buffer) <= _KEEP_BUFFER:
                    self._buffer = buffer
                continue
            if n > cap:
                raise self._too_large(algorithm)
            return bytes(memoryview(buffer)[:n])
