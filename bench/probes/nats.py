"""Core NATS and JetStream: open-loop senders, subscribers as receivers, round trips.

A receiver for a JetStream sink is a core subscription on the stream's
subject: the server delivers to it as it takes the message into the stream
(natsconn's sink waits for the PubAck, which follows the store).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.msg import Msg

from ..endpoint import Ready
from ..legs.nats import connect
from ..model import Params, Place
from ..schedule import MIN_SIZE, Schedule
from ..timed import Arrivals, open_loop, receiver, round_trip, sender


@sender("nats")
async def send_core(env: dict[str, str], place: Place, params: Params,
                    schedule: Schedule) -> dict[str, Any]:
    nc = await connect(env, "bench-latency-send")
    subject, publish = place["subject"], nc.publish

    async def write(payloads: list[bytes]) -> None:
        for data in payloads:
            await publish(subject, data)

    out = await open_loop(schedule, params.size, write)
    await nc.flush(timeout=30)
    await nc.close()
    return out


@sender("jetstream")
async def send_jetstream(env: dict[str, str], place: Place, params: Params,
                         schedule: Schedule) -> dict[str, Any]:
    """Publishes with a reply subject on one inbox; PubAcks are counted by a callback
    and never waited for before the next send (open loop); all of them at the end."""
    nc = await connect(env, "bench-latency-send")
    inbox = nc.new_inbox()
    acks = {"ok": 0, "errors": 0}
    all_acked = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        if b'"error"' in msg.data or (msg.headers and msg.headers.get("Status")):
            acks["errors"] += 1
        else:
            acks["ok"] += 1
        if acks["ok"] + acks["errors"] >= schedule.count:
            all_acked.set()

    await nc.subscribe(inbox, cb=on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1)
    subject, publish = place["subject"], nc.publish

    async def write(payloads: list[bytes]) -> None:
        for data in payloads:
            await publish(subject, data, reply=inbox)

    out = await open_loop(schedule, params.size, write)
    try:
        await asyncio.wait_for(all_acked.wait(), 60)
    except TimeoutError:
        out["notes"] = [f"only {acks['ok'] + acks['errors']} PubAcks"]
    out["publish_errors"] = acks["errors"]
    await nc.close()
    return out


async def _subscribe(env: dict[str, str], place: Place, arrivals: Arrivals,
                     ready: Ready) -> None:
    nc = await connect(env, "bench-latency-receive")
    add, clock = arrivals.add, time.time_ns

    async def on_msg(msg: Msg) -> None:
        add(msg.data, clock())

    await nc.subscribe(place["subject"], cb=on_msg, pending_msgs_limit=-1,
                       pending_bytes_limit=-1)
    await nc.flush()
    await ready()
    await arrivals.wait(deadline=600)
    await nc.close()


@receiver("nats")
async def receive_core(env: dict[str, str], place: Place, params: Params, arrivals: Arrivals,
                       ready: Ready) -> None:
    await _subscribe(env, place, arrivals, ready)


@receiver("jetstream")
async def receive_jetstream(env: dict[str, str], place: Place, params: Params,
                            arrivals: Arrivals, ready: Ready) -> None:
    await _subscribe(env, place, arrivals, ready)


@round_trip("nats")
async def round_trip_core(env: dict[str, str], place: Place, params: Params,
                          n: int) -> list[int]:
    """One publish and a flush (PING/PONG): the server has it once PONG is back."""
    nc = await connect(env, "bench-rtt")
    data = bytes(max(params.size, MIN_SIZE))
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await nc.publish(place["subject"], data)
        await nc.flush()
        out.append(time.perf_counter_ns() - t0)
    await nc.close()
    return out


@round_trip("jetstream")
async def round_trip_jetstream(env: dict[str, str], place: Place, params: Params,
                               n: int) -> list[int]:
    """One publish and its PubAck (a request to the stream's subject)."""
    nc = await connect(env, "bench-rtt")
    data = bytes(max(params.size, MIN_SIZE))
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await nc.request(place["subject"], data, timeout=10)
        out.append(time.perf_counter_ns() - t0)
    await nc.close()
    return out
