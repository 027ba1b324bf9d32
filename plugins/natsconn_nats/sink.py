"""The ``nats`` sink: core NATS publish, flushed per batch."""

from __future__ import annotations

from collections.abc import Sequence

from nats.aio.client import Client as NATS
from nats.errors import BadSubjectError
from pydantic import Field

from connector import AddressTemplate, Message, PartialWriteError, RejectedError, Sink

from .connection import NatsConnectionConfig, nats_error, open_connection


class NatsSinkConfig(NatsConnectionConfig):
    subject: str = Field("{subject}", description="subject template: {subject}, "
                         "{subject[N]}, {header[Name]}, {key}, {id}")
    flush_timeout: float = Field(10.0, gt=0, description="seconds to wait for the server "
                                 "to confirm a batch (PING/PONG)")


class NatsSink(Sink[NatsSinkConfig]):
    """Core NATS publish; a batch counts as written when the server has it."""

    Config = NatsSinkConfig

    async def connect(self) -> None:
        self._template = AddressTemplate(self.config.subject)
        self._nc: NATS = await open_connection(self.config, self.context)

    async def write_batch(self, messages: Sequence[Message]) -> None:
        nc = self._nc
        render = self._template.render
        max_payload = nc.max_payload
        rejected: dict[int, RejectedError] = {}
        try:
            for i, m in enumerate(messages):
                try:
                    subject = render(m)
                except RejectedError as exc:
                    rejected[i] = exc
                    continue
                if len(m.data) > max_payload:
                    rejected[i] = RejectedError(
                        f"payload of {len(m.data)} bytes exceeds the server's max_payload "
                        f"{max_payload}")
                    continue
                try:
                    await nc.publish(subject, m.data, headers=dict(m.headers) or None)
                except BadSubjectError:
                    rejected[i] = RejectedError(f"invalid NATS subject {subject!r}")
            await nc.flush(timeout=self.config.flush_timeout)  # type: ignore[arg-type]
        except Exception as exc:
            raise nats_error(exc) from exc
        if rejected:
            raise PartialWriteError(rejected)

    async def close(self) -> None:
        nc = getattr(self, "_nc", None)
        if nc is not None:
            try:
                await nc.flush(timeout=5)
            finally:
                await nc.close()
