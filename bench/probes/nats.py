"""Core NATS and JetStream: open-loop senders, subscribers as receivers, round trips.

A receiver for a JetStream sink is a core subscription on the stream's
subject: the server delivers to it as it takes the message into the stream
(natsconn's sink waits for the PubAck, which follows the store).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from natsconn_nats.connection import Client, encode_publish

from ..endpoint import Ready
from ..legs.nats import DEFAULT_URL, connect
from ..model import Params, Place
from ..schedule import MIN_SIZE, Schedule
from ..timed import Arrivals, open_loop, receiver, round_trip, sender, time_each


async def _client(env: dict[str, str], name: str) -> Client:
    nc = Client()
    await nc.connect(servers=[env.get("NATS_URL", DEFAULT_URL)], name=name,
                     pending_size=64 * 1024 * 1024, max_reconnect_attempts=0,
                     allow_reconnect=False)
    return nc


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
    """Publishes with a reply subject on one inbox; PubAcks are counted as they are
    parsed and never waited for before the next send (open loop); all of them at
    the end. Encoded and acknowledged the cheap way natsconn's own sink does it
    (direct delivery, one buffer append per chunk): with nats-py's publish() and a
    callback per PubAck the sender took half a core at 30k msg/s, and its own
    lateness, counted in the latency, grew with the machine's load."""
    nc = await _client(env, "bench-latency-send")
    inbox = nc.new_inbox()
    acks = {"ok": 0, "errors": 0}
    all_acked = asyncio.Event()

    def on_ack(_subject: str, _reply: str, data: bytes, headers: object) -> None:
        if b'"error"' in data or headers:
            acks["errors"] += 1
        else:
            acks["ok"] += 1
        if acks["ok"] + acks["errors"] >= schedule.count:
            all_acked.set()

    await nc.subscribe_direct(inbox, on_ack)
    subject = place["subject"]

    async def write(payloads: list[bytes]) -> None:
        await nc.send_encoded([encode_publish(subject, data, None, inbox) for data in payloads],
                              len(payloads), sum(len(d) for d in payloads))

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
    """Stamp each message as nats-py parses it (natsconn's direct delivery), not
    when a subscription task gets round to its callback: a sink batch arrives as
    one burst, and a callback per message would add its own queueing (about
    5 µs a message, milliseconds for the last of a 1,000-message batch) to the
    latency measured."""
    nc = await _client(env, "bench-latency-receive")
    add, clock = arrivals.add, time.time_ns

    def on_msg(_subject: str, _reply: str, data: bytes, _headers: object) -> None:
        add(data, clock())

    await nc.subscribe_direct(place["subject"], on_msg)
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

    async def publish_and_flush() -> None:
        await nc.publish(place["subject"], data)
        await nc.flush()

    out = await time_each(n, publish_and_flush)
    await nc.close()
    return out


@round_trip("jetstream")
async def round_trip_jetstream(env: dict[str, str], place: Place, params: Params,
                               n: int) -> list[int]:
    """One publish and its PubAck (a request to the stream's subject)."""
    nc = await connect(env, "bench-rtt")
    data = bytes(max(params.size, MIN_SIZE))
    out = await time_each(n, lambda: nc.request(place["subject"], data, timeout=10))
    await nc.close()
    return out
