"""What one system contributes to the harness: an Endpoint per source/sink type.

An endpoint is the far side of one natsconn plugin type (``jetstream``,
``nats``, ``kafka``…). It knows how to make a fresh place to read or write,
how to fill it, how to count what arrived there, the plugin block that points
natsconn at it, and the raw legs: the same work done with the system's own
client and its best technique, without natsconn.

Raw legs run inside a worker subprocess (bench/worker.py) so their CPU time
and peak RSS are measured the way natsconn's are. Everything else runs in the
harness process.

To add a system, write ``bench/legs/<system>.py`` with Endpoint subclasses and
``register(...)`` calls; see bench/README.md.
"""

from __future__ import annotations

import os
import resource
import time
from abc import ABC
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from .model import Params, Place, Sample

SERVER_PROCESSES: dict[str, tuple[str, ...]] = {
    "nats": ("nats-server",),
    "kafka": ("java",),
    "redis": ("redis-server",),
    "postgres": ("postgres",),
}

Ready = Callable[[], Awaitable[None]]
"""Called by a consume leg once it is subscribed, before the live feed starts."""


class Endpoint(ABC):
    """One plugin type's far side. Subclasses set the class attributes and
    implement the hooks their roles need (a sink-only endpoint needs no
    ``preload``; a source-only one no ``delivered``)."""

    name: ClassVar[str]  # the plugin type in pipeline.yaml
    system: ClassVar[str]  # the service it needs, as in `scripts/services start <system>`
    durable: ClassVar[bool] = True  # False: a source needs a live feed (core NATS, pub/sub)
    # True: workers share this source through a consumer group that forms only once
    # they are up (Kafka); with --workers it is then fed after /readyz, as a live
    # source is, instead of preloaded: preloaded, the first worker drains it while
    # the others are still joining, before the window can open
    group_shared: ClassVar[bool] = False
    gives_ids: ClassVar[bool] = False  # its source sets Message.id
    uses_ids: ClassVar[bool] = False  # its sink writes Message.id (dedupe key, upsert key)
    # how a produce leg carrying ids names them in the report (``uses_ids`` sinks)
    ids_label: ClassVar[str] = "with ids"
    # technique -> one line describing it; methods produce_<technique>/consume_<technique>
    produce_legs: ClassVar[dict[str, str]] = {}
    consume_legs: ClassVar[dict[str, str]] = {}
    # the produce technique used to preload (durable) or feed (not durable) a source
    feed_technique: ClassVar[str | None] = None
    # command names (/proc/<pid>/comm) of the server processes this endpoint talks to:
    # their CPU is part of the measured work, not foreign load; None: by `system`
    server_processes: ClassVar[tuple[str, ...] | None] = None

    # the env variable holding the server's URL (a sink can then be put behind a
    # TcpProxy: `python -m bench stall`); None: not proxyable (Kafka's clients go to
    # the advertised broker addresses after bootstrap, around a proxy)
    address_env: ClassVar[str | None] = None
    default_url: ClassVar[str] = ""

    @classmethod
    def servers(cls) -> tuple[str, ...]:
        if cls.server_processes is not None:
            return cls.server_processes
        return SERVER_PROCESSES.get(cls.system, ())

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    # ---- harness side -----------------------------------------------------

    async def open(self) -> None:
        """Connect the harness's own admin client, if any."""

    async def close(self) -> None:
        """Release the admin client."""

    async def create(self, tag: str, params: Params, role: str) -> Place:
        """A fresh, empty place for one run; ``role`` is ``source`` or ``sink``."""
        raise NotImplementedError(f"{self.name} cannot be a {role}")

    async def destroy(self, place: Place) -> None:
        """Remove what ``create`` made."""

    async def delivered(self, place: Place) -> int:
        """How many messages the far side holds now (sink role). Polled every few ms."""
        raise NotImplementedError(f"{self.name} cannot count deliveries")

    async def arrivals(self, place: Place, prefix: int) -> dict[str, Any] | None:
        """Sink role, after a run (not timed): ``{"records", "distinct"}`` read back
        from the place, distinct by the payloads' first ``prefix`` bytes (payload
        "seq"); None where the harness cannot read them back."""
        return None

    def source_block(self, place: Place, params: Params) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name} has no source plugin")

    def sink_block(self, place: Place, params: Params) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name} has no sink plugin")

    def describe(self) -> dict[str, str]:
        """Conditions worth recording (server version, storage…)."""
        return {}

    async def backlog(self, place: Place) -> dict[str, int]:
        """Source role: what waits at the source and what is delivered but not
        acknowledged, where the system tells (polled every 0.5 s by `bench stall`)."""
        return {}

    async def consuming(self, place: Place) -> bool:
        """Source role: has natsconn's source begun to consume (a consumer group
        joined and assigned)? `bench latency` waits for it before sending, so a group
        join does not queue up the first messages."""
        return True

    def server_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the server this endpoint's plugin connects to."""
        if self.address_env is None:
            return None
        url = urlsplit(self.env.get(self.address_env, self.default_url))
        if url.hostname is None or url.port is None:
            return None
        return url.hostname, url.port

    def via(self, host: str, port: int) -> Endpoint:
        """The same endpoint with its plugin pointed at ``host:port`` (a proxy)."""
        if self.address_env is None:
            raise NotImplementedError(f"{self.name} cannot be put behind a proxy")
        url = urlsplit(self.env.get(self.address_env, self.default_url))
        auth = url.netloc.rpartition("@")[0]
        netloc = (auth + "@" if auth else "") + f"{host}:{port}"
        env = {**self.env, self.address_env: urlunsplit(url._replace(netloc=netloc))}
        return type(self)(env)

    # ---- worker side (inside the leg's own process) -------------------------

    async def produce(self, technique: str, place: Place, params: Params) -> Sample:
        leg = getattr(self, f"produce_{technique}", None)
        if leg is None:
            raise KeyError(f"{self.name} has no produce leg {technique!r}")
        result: Sample = await leg(place, params)
        return result

    async def consume(self, technique: str, place: Place, params: Params, ready: Ready) -> Sample:
        leg = getattr(self, f"consume_{technique}", None)
        if leg is None:
            raise KeyError(f"{self.name} has no consume leg {technique!r}")
        result: Sample = await leg(place, params, ready)
        return result


class Stopwatch:
    """Wall time and this process's CPU time over a window, and its peak RSS."""

    __slots__ = ("cpu0", "t0")

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def restart(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def sample(self, messages: int, delivered: int | None = None,
               notes: list[str] | None = None) -> Sample:
        seconds = time.perf_counter() - self.t0
        cpu = time.process_time() - self.cpu0
        return Sample(messages, seconds, cpu, peak_rss(), delivered, os.getloadavg()[0],
                      notes=notes or [], started=self.t0)


def peak_rss() -> int:
    """This process's peak resident set, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
