"""Issue 16 against a real nats-server: the admin API pauses a JetStream pipeline
under load without losing or redelivering anything, restarts it, refuses
mutations without the token; a hot reload with three edits at once leaves the
untouched pipeline running on its connection while 100,000 messages flow, and a
broken file changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.client import Client as NATS

from .helpers import (
    NatsconnProcess,
    assert_exactly,
    consumer_info,
    create_stream,
    natsconn_process,
    pipeline_file,
    publish_js,
    read_stream,
    seq_of,
    stream_count,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("delete_streams")]

TOKEN = "admin-token-for-tests-4f1c"


async def http(proc: NatsconnProcess, method: str, path: str, token: str | None = None
               ) -> tuple[int, str, Any]:
    """(status, content type, parsed JSON body) of one request to natsconn's listener."""

    def call() -> tuple[int, str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{proc.port}{path}", method=method,
                                     data=b"" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers["Content-Type"], json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], json.loads(exc.read())

    return await asyncio.to_thread(call)


async def pipeline(proc: NatsconnProcess, name: str) -> dict[str, Any]:
    status, _, body = await http(proc, "GET", f"/pipelines/{name}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def js_pipeline(nats_url: str, name: str, stream: str, into: str, **extra: Any
                ) -> dict[str, Any]:
    return {
        "name": name,
        "source": {"type": "jetstream", "servers": [nats_url], "stream": stream,
                   "durable": f"d-{name}", "ack_wait": "2s"},
        "sink": {"type": "jetstream", "servers": [nats_url], "stream": into},
        "batch": {"max_messages": 200, "max_wait": "10ms"},
        **extra,
    }


async def test_pause_under_load_stops_reads_redelivers_nothing_and_resume_drains(
        tmp_path: Path, nc: NATS, nats_url: str, unique: str) -> None:
    src, dst, n = f"PAUSE_IN_{unique}", f"PAUSE_OUT_{unique}", 20_000
    await create_stream(nc, src, [f"pause.in.{unique}.>"])
    await create_stream(nc, dst, [f"pause.out.{unique}.>"])
    await publish_js(nc, lambda i: f"pause.in.{unique}.{i % 4}", n)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    name = "paused"
    spec = js_pipeline(nats_url, name, src, dst, max_in_flight=1)
    spec["sink"]["subject"] = f"pause.out.{unique}.{{subject[-1]}}"
    # Slow enough to pause mid-stream.
    spec["batch"] = {"max_messages": 50, "max_wait": "5ms"}
    file = pipeline_file(tmp_path, [spec], http={"admin_token_file": str(token_file)})
    async with natsconn_process(file) as proc:
        await wait_until(lambda: _more_than(nc, dst, 2_000), 60, "2,000 messages through")
        status, ctype, body = await http(proc, "POST", f"/pipelines/{name}/pause")
        assert (status, ctype) == (401, "application/problem+json"), body
        assert body["status"] == 401 and body["title"] == "Unauthorized"
        status, _, body = await http(proc, "POST", f"/pipelines/{name}/pause", "wrong")
        assert status == 401
        status, _, body = await http(proc, "POST", f"/pipelines/{name}/pause", TOKEN)
        assert status == 202 and body == {"name": name, "action": "pause", "accepted": True}

        async def settled() -> bool:
            p = await pipeline(proc, name)
            return bool(p["state"] == "paused" and p["in_flight"]["messages"] == 0)

        await wait_until(settled, 20, "paused with nothing in flight")
        held = await stream_count(nc, dst)
        assert held < n, "the pause came too late to test anything"
        # Longer than ack_wait (2 s) twice over: the prefetch must stay alive.
        await asyncio.sleep(5)
        assert await stream_count(nc, dst) == held, "a paused pipeline kept writing"
        info = await consumer_info(nc, src, f"d-{name}")
        assert info.num_redelivered == 0 and _redeliveries(info) == 0, \
            "a pause made the server redeliver"
        assert info.num_pending + info.num_ack_pending > 0, "the source lag grows while paused"

        status, _, _ = await http(proc, "POST", f"/pipelines/{name}/resume", TOKEN)
        assert status == 202
        await wait_until(lambda: _at_least(nc, dst, n), 90, f"all {n} in {dst}")
        assert _redeliveries(await consumer_info(nc, src, f"d-{name}")) == 0

        status, _, body = await http(proc, "POST", f"/pipelines/{name}/restart", TOKEN)
        assert status == 202

        async def restarted() -> bool:
            p = await pipeline(proc, name)
            return bool(p["reloads"] == 1 and p["state"] == "running")

        await wait_until(restarted, 30, "restarted through the API")
        p = await pipeline(proc, name)
        assert p["restarts"] == 0, "a restart asked for is not a failure"
        status, ctype, body = await http(proc, "GET", "/pipelines/nope")
        assert (status, ctype) == (404, "application/problem+json")
        assert "no pipeline named 'nope'" in body["detail"] and body["instance"] == \
            "/pipelines/nope"
    seqs = [seq_of(m.data) for m in await read_stream(nc, dst)]
    assert_exactly(seqs, n, dst)


def _redeliveries(info: Any) -> int:
    """Deliveries beyond the first, ever (num_redelivered counts only those still
    unacknowledged)."""
    return int(info.delivered.consumer_seq - info.delivered.stream_seq)


async def _more_than(nc: NATS, stream: str, count: int) -> bool:
    return await stream_count(nc, stream) > count


async def _at_least(nc: NATS, stream: str, count: int) -> bool:
    return await stream_count(nc, stream) >= count


async def _connz(nats_url: str) -> dict[str, int]:
    """Connection name → cid, from the server's monitoring endpoint."""
    host = nats_url.split("//", 1)[-1].split(":", 1)[0]

    def call() -> dict[str, int]:
        url = f"http://{host}:8222/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.loads(resp.read())
        return {c.get("name", ""): c["cid"] for c in doc.get("connections", [])}

    return await asyncio.to_thread(call)


async def test_reload_under_load_changes_only_what_changed_and_loses_nothing(
        tmp_path: Path, nc: NATS, nats_url: str, unique: str) -> None:
    src, dst, n = f"RL_IN_{unique}", f"RL_OUT_{unique}", 100_000
    await create_stream(nc, src, [f"rl.in.{unique}.>"])
    await create_stream(nc, dst, [f"rl.out.{unique}.>"])
    keep = js_pipeline(nats_url, "keep", src, dst)
    keep["sink"]["subject"] = f"rl.out.{unique}.{{subject[-1]}}"
    changing = {"name": "changing", "source": {"type": "generate", "rate": 200},
                "sink": {"type": "drop"}}
    going = {"name": "going", "source": {"type": "generate", "rate": 100},
             "sink": {"type": "drop"}}
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    settings = {"http": {"admin_token_file": str(token_file)}}
    file = pipeline_file(tmp_path, [keep, changing, going], **settings)
    async with natsconn_process(file) as proc:
        before = await _connz(nats_url)
        keep_cid = before["natsconn:keep:source"]
        publisher = asyncio.create_task(
            publish_js(nc, lambda i: f"rl.in.{unique}.{i % 8}", n, timeout=60))
        try:
            await wait_until(lambda: _more_than(nc, dst, 10_000), 60, "10,000 through")
            # Three edits at once: one changed, one removed, one added.
            changed = {**changing, "source": {"type": "generate", "rate": 300}}
            added = {"name": "added", "source": {"type": "generate", "rate": 50},
                     "sink": {"type": "drop"}}
            pipeline_file(tmp_path, [keep, changed, added], **settings)
            status, _, body = await http(proc, "POST", "/reload", TOKEN)
            assert status == 200, body
            assert body["ok"] and body["unchanged"] == ["keep"]
            assert body["changed"] == ["changing"] and body["removed"] == ["going"]
            assert body["added"] == ["added"]
            assert await stream_count(nc, dst) < n, "the reload came after the flow"

            async def applied() -> bool:
                _, _, doc = await http(proc, "GET", "/pipelines")
                states = {p["name"]: p["state"] for p in doc["pipelines"]}
                return states == {"keep": "running", "changing": "running",
                                  "added": "running"}

            await wait_until(applied, 30, "the three edits applied")
            await publisher
        finally:
            if not publisher.done():
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
        await wait_until(lambda: _at_least(nc, dst, n), 120, f"all {n} in {dst}")
        kept = await pipeline(proc, "keep")
        assert (kept["restarts"], kept["reloads"]) == (0, 0), "the untouched pipeline restarted"
        assert (await _connz(nats_url)).get("natsconn:keep:source") == keep_cid, \
            "the untouched pipeline's connection changed"
        assert (await pipeline(proc, "changing"))["reloads"] == 1
        assert (await pipeline(proc, "changing"))["config"]["source"]["rate"] == 300
        assert _redeliveries(await consumer_info(nc, src, "d-keep")) == 0, \
            "the untouched pipeline's messages were delivered twice"

        # A broken file changes nothing and says where it is broken.
        file.write_text(file.read_text().replace("rate: 300", "rate: [300"))
        status, ctype, body = await http(proc, "POST", "/reload", TOKEN)
        assert (status, ctype) == (422, "application/problem+json")
        assert f"{file}:" in body["detail"] or "pipeline.yaml:" in body["detail"]
        assert body["reload"]["ok"] is False
        status, _, doc = await http(proc, "GET", "/pipelines")
        assert sorted(p["name"] for p in doc["pipelines"]) == ["added", "changing", "keep"]
        assert (await pipeline(proc, "changing"))["reloads"] == 1, "a broken file restarted"
        assert doc["last_reload"]["ok"] is False

        # SIGHUP reloads too: a fixed file removes `added`.
        pipeline_file(tmp_path, [keep, changed], **settings)
        proc.signal(signal.SIGHUP)

        async def gone() -> bool:
            _, _, doc = await http(proc, "GET", "/pipelines")
            return sorted(p["name"] for p in doc["pipelines"]) == ["changing", "keep"]

        await wait_until(gone, 20, "SIGHUP applied the file")
        assert "natsconn_reloads_total" in (await proc.http_get("/metrics"))[1].decode()
    seqs = [seq_of(m.data) for m in await read_stream(nc, dst, timeout=120)]
    assert_exactly(seqs, n, dst)


async def test_watch_reloads_when_the_file_changes(tmp_path: Path) -> None:
    one = {"name": "one", "source": {"type": "generate", "rate": 10}, "sink": {"type": "drop"}}
    two = {"name": "two", "source": {"type": "generate", "rate": 10}, "sink": {"type": "drop"}}
    file = pipeline_file(tmp_path, [one])
    proc = await NatsconnProcess.start(file)
    # --watch is a flag of `run`: restart the process with it.
    await proc.kill()
    proc = await _start_watching(file)
    try:
        await proc.wait_ready()
        text = yaml.safe_dump({"pipelines": [one, two]}, sort_keys=False)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(file)  # as editors save: a new file renamed over the old

        async def both() -> bool:
            _, _, doc = await http(proc, "GET", "/pipelines")
            return sorted(p["name"] for p in doc["pipelines"]) == ["one", "two"]

        await wait_until(both, 20, "--watch picked up the new file")
    finally:
        await proc.kill()


async def _start_watching(file: Path) -> NatsconnProcess:
    from .helpers import NATSCONN, free_port

    port = free_port()
    log_path = file.with_name("watch.log")
    with log_path.open("wb") as log:
        child = await asyncio.create_subprocess_exec(
            NATSCONN, "run", str(file), "--watch", "--http-address", f"127.0.0.1:{port}",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    return NatsconnProcess(child, file, log_path, port)
