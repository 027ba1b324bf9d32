"""Issue 4: an ACL user with a password works for the Redis source and sink; a
wrong password is one clear error naming the pipeline (and never the password).

The user is created by the test (ACL SETUSER, allowed only its own keys and
channels) and deleted afterwards. The password reaches the pipeline file
through ``${VAR}`` interpolation, as it would in production.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from ..helpers import (
    Collector,
    assert_exactly,
    natsconn_process,
    pipeline_file,
    publish_core,
    run_in_process,
    wait_ready_in_process,
    wait_until,
)
from .redis_helpers import at, fill_stream, pending

pytestmark = pytest.mark.integration

N = 2000
PASSWORD_VAR = "NATSCONN_IT_REDIS_PASSWORD"


@pytest.fixture
async def acl_user(r: aioredis.Redis, unique: str) -> AsyncIterator[tuple[str, str]]:
    name, password = f"natsconn-it-{unique}", f"pw-{unique}-s3cret"
    await r.acl_setuser(name, enabled=True, passwords=[f"+{password}"],
                        keys=[f"it:{unique}:*"], channels=[f"it:{unique}:*"],
                        commands=["+@all", "-@dangerous"], reset=True)
    yield name, password
    await r.acl_deluser(name)


async def test_acl_user_with_password(
        nc: NATS, r: aioredis.Redis, nats_url: str, redis_address: tuple[str, int],
        unique: str, tmp_path: Path, acl_user: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    user, password = acl_user
    monkeypatch.setenv(PASSWORD_VAR, password)
    creds = {**at(redis_address), "username": user, "password": f"${{{PASSWORD_VAR}}}"}
    stream_in, stream_out, group = f"it:{unique}:acl-in", f"it:{unique}:acl-out", "g"
    await fill_stream(r, stream_in, N)
    out = await Collector.subscribe(nc, f"acl.{unique}.out")
    file = pipeline_file(tmp_path, [
        {"name": f"acl-from-redis-{unique}",
         "source": {"type": "redis_stream", **creds, "streams": [stream_in], "group": group},
         "sink": {"type": "nats", "servers": [nats_url], "subject": f"acl.{unique}.out"}},
        {"name": f"acl-to-redis-{unique}",
         "source": {"type": "nats", "servers": [nats_url], "subjects": [f"acl.{unique}.in"]},
         "sink": {"type": "redis_stream", **creds, "stream": stream_out}},
    ])
    async with run_in_process(file) as supervisor:
        await wait_ready_in_process(supervisor)
        await out.wait_for(N, timeout=30)
        await publish_core(nc, f"acl.{unique}.in", N)
        await wait_until(lambda: _xlen_is(r, stream_out, N), 30, f"{N} entries in {stream_out}")
        await wait_until(lambda: _pending_is(r, stream_in, group, 0), 10, "XPENDING 0")
    assert_exactly(out.seqs(), N, "from Redis as the ACL user")
    listed: Any = await r.execute_command("CLIENT", "LIST")  # type: ignore[no-untyped-call]
    clients = listed.decode()
    assert f"user={user}" not in clients, "natsconn's connections stayed open after stop"


async def test_wrong_password_is_one_clear_error(
        nats_url: str, redis_address: tuple[str, int], unique: str, tmp_path: Path,
        acl_user: tuple[str, str]) -> None:
    user, password = acl_user
    wrong = f"not-{password}"
    pipeline = f"acl-wrong-{unique}"
    file = pipeline_file(tmp_path, [{
        "name": pipeline,
        "source": {"type": "redis_stream", **at(redis_address), "username": user,
                   "password": f"${{{PASSWORD_VAR}}}", "streams": [f"it:{unique}:x"]},
        "sink": {"type": "nats", "servers": [nats_url], "subject": f"acl.{unique}.x"},
    }])
    async with natsconn_process(file, ready=False, env={PASSWORD_VAR: wrong}) as proc:
        await wait_until(lambda: "authentication failed" in proc.log(), 20,
                         "the authentication error in the log")
        status, _ = await proc.readyz()
        log = proc.log()
    assert status == 503, status
    errors = [json.loads(line) for line in log.splitlines()
              if line.startswith("{") and json.loads(line)["level"] == "error"]
    first = errors[0]["msg"]
    assert pipeline in first and user in first and "authentication failed" in first, first
    assert "invalid username-password pair" in first, first  # what Redis said
    assert wrong not in log and password not in log, "a password appeared in the log"
    assert "Traceback" not in log, log
    # One line per attempt: the supervisor retries with backoff, each attempt one line.
    assert all(e["msg"] == first for e in errors), [e["msg"] for e in errors]
    print(f"\nwrong password: {first}")


async def _xlen_is(r: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await r.xlen(stream)) == n


async def _pending_is(r: aioredis.Redis, stream: str, group: str, n: int) -> bool:
    return await pending(r, stream, group) == n
