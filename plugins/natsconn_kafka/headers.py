"""Kafka header values are bytes; natsconn's are ``str``.

Values are decoded as UTF-8 with ``surrogateescape``: valid UTF-8 reads as the
text it is, and any other byte becomes a lone surrogate that encodes back to
the very same byte. So Kafka → natsconn → Kafka keeps every header value byte
for byte, whatever it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ENCODING = "utf-8"
ERRORS = "surrogateescape"


def decode_headers(pairs: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """Kafka headers as natsconn headers. A name given twice keeps its last value."""
    return {name: (value or b"").decode(ENCODING, ERRORS) for name, value in pairs}


def encode_headers(headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
    return [(name, value.encode(ENCODING, ERRORS)) for name, value in headers.items()]


def encode_text(text: str) -> bytes:
    return text.encode(ENCODING, ERRORS)


def decode_bytes(data: bytes) -> str:
    return data.decode(ENCODING, ERRORS)
