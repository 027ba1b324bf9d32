"""Redis streams: an open-loop sender (a pipeline of XADDs per chunk), XREAD as
the receiver, one XADD as the round trip."""

from __future__ import annotations

import time
from typing import Any

from ..endpoint import Ready
from ..legs.redis import DEFAULT_URL, _client
from ..model import Params, Place
from ..schedule import MIN_SIZE, Schedule
from ..timed import Arrivals, open_loop, receiver, round_trip, sender, time_each


@sender("redis_stream")
async def send_redis_stream(env: dict[str, str], place: Place, params: Params,
                            schedule: Schedule) -> dict[str, Any]:
    r = _client(env.get("REDIS_URL", DEFAULT_URL), "bench-latency-send", 2)
    await r.ping()
    stream, subject = place["stream"], place["subject"]
    errors = 0

    async def write(payloads: list[bytes]) -> None:
        nonlocal errors
        pipe = r.pipeline(transaction=False)
        for data in payloads:
            pipe.execute_command("XADD", stream, "*", "data", data, "subject", subject)
        replies = await pipe.execute(raise_on_error=False)
        errors += sum(isinstance(x, Exception) for x in replies)

    out = await open_loop(schedule, params.size, write)
    out["publish_errors"] = errors
    await r.aclose()
    return out


@receiver("redis_stream")
async def receive_redis_stream(env: dict[str, str], place: Place, params: Params,
                               arrivals: Arrivals, ready: Ready) -> None:
    """XREAD BLOCK from the beginning, 1,000 entries at a time; the ``data`` field."""
    r = _client(env.get("REDIS_URL", DEFAULT_URL), "bench-latency-receive", 2)
    await r.ping()
    stream, last = place["stream"], b"0-0"
    await ready()
    add = arrivals.add
    idle_since = give_up = time.monotonic()
    give_up += 600
    while not arrivals.done and time.monotonic() < give_up:
        reply: Any = await r.execute_command(  # type: ignore[no-untyped-call]
            "XREAD", "COUNT", 1000, "BLOCK", 100, "STREAMS", stream, last)
        now = time.time_ns()
        if not reply:
            if arrivals.received and time.monotonic() - idle_since > arrivals.idle:
                break
            continue
        idle_since = time.monotonic()
        for _, entries in reply:
            for entry_id, fields in entries:
                last = entry_id
                # redis-py's XREAD callback gives a dict; a raw reply a flat list
                values = fields if isinstance(fields, dict) else dict(
                    zip(fields[::2], fields[1::2], strict=False))
                data = values.get(b"data")
                if data is not None:
                    add(data, now)
    await r.aclose()


@round_trip("redis_stream")
async def round_trip_redis_stream(env: dict[str, str], place: Place, params: Params,
                                  n: int) -> list[int]:
    r = _client(env.get("REDIS_URL", DEFAULT_URL), "bench-rtt", 1)
    await r.ping()
    data = bytes(max(params.size, MIN_SIZE))
    out = await time_each(n, lambda: r.execute_command(  # type: ignore[no-untyped-call]
        "XADD", place["stream"], "*", "data", data, "subject", "rtt"))
    await r.aclose()
    return out
