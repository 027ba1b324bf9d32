"""``natsconn status`` and ``natsconn pipelines pause|resume|restart NAME``: the admin
API from a terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:8080"
EXIT_FAILED = 1

STATUS_EXAMPLE = """example:
  natsconn status                          # the instance on 127.0.0.1:8080
  natsconn status --address 10.0.0.7:8080 --watch
"""
PIPELINES_EXAMPLE = """example:
  NATSCONN_ADMIN_TOKEN=... natsconn pipelines pause orders-to-kafka
  natsconn pipelines restart orders-to-kafka --token-file /run/secrets/admin-token
"""


def add_commands(sub: Any) -> None:
    st = sub.add_parser("status", help="a running instance's pipelines, states, rates, lag",
                        epilog=STATUS_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(st)
    st.add_argument("--watch", action="store_true", help="refresh every 2 seconds")
    st.add_argument("--json", action="store_true", help="print the API's JSON")
    pl = sub.add_parser("pipelines", help="pause, resume or restart a pipeline of a running "
                        "instance", epilog=PIPELINES_EXAMPLE,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("action", choices=["pause", "resume", "restart"])
    pl.add_argument("name", help="the pipeline's name")
    _common(pl)
    pl.add_argument("--token-file", help="file with the admin token (default: "
                    "$NATSCONN_ADMIN_TOKEN)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("NATSCONN_ADDRESS", DEFAULT_ADDRESS),
                   help="host:port of its ops listener (default: $NATSCONN_ADDRESS or "
                   f"{DEFAULT_ADDRESS})")


class ApiError(Exception):
    pass


def _request(address: str, method: str, path: str, token: str | None = None) -> Any:
    url = f"http://{address}{path}"
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    req.add_header("Accept", "application/json")
    if method == "POST":
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", "")
        except ValueError:
            detail = ""
        raise ApiError(f"{method} {url}: {exc.code} {exc.reason}"
                       + (f": {detail}" if detail else "")) from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise ApiError(f"cannot reach natsconn at {address} ({why}); is it running with "
                       "its HTTP listener on, and is --address right?") from None


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def table(pipelines: list[dict[str, Any]]) -> str:
    head = ("PIPELINE", "STATE", "READ", "WRITTEN", "IN FLIGHT", "LAG", "DEAD", "RESTARTS",
            "LAST ERROR")
    rows = [head]
    for p in pipelines:
        err = p.get("last_error")
        rows.append((
            p["name"], p["state"], _rate(p["rates"]["read_per_second"]),
            _rate(p["rates"]["written_per_second"]),
            f'{p["in_flight"]["messages"]:,}/{p["in_flight"]["max_messages"]:,}',
            f'{p["lag"]:,.0f}', f'{p["totals"]["dead_lettered"]:,.0f}', str(p["restarts"]),
            (err["message"][:60] if err else "-"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def main(args: argparse.Namespace) -> int:
    try:
        if args.command == "status":
            return _status(args)
        return _act(args)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0


def _status(args: argparse.Namespace) -> int:
    token = os.environ.get("NATSCONN_ADMIN_TOKEN")
    while True:
        doc = _request(args.address, "GET", "/pipelines", token)
        if args.json:
            out = json.dumps(doc, indent=2)
        else:
            out = table(doc["pipelines"])
            last = doc.get("last_reload")
            if last:
                out += (f"\nlast reload {last['at']}: "
                        + ("applied" if last["ok"] else f"refused: {last.get('error')}"))
        if args.watch:
            print("\x1b[H\x1b[2J", end="")
            print(f"natsconn at {args.address}, {time.strftime('%H:%M:%S')}\n")
        print(out, flush=True)
        if not args.watch:
            return 0
        time.sleep(2)


def _act(args: argparse.Namespace) -> int:
    if args.token_file:
        try:
            token: str | None = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ApiError(f"cannot read {args.token_file}: {exc.strerror or exc}") from None
    else:
        token = os.environ.get("NATSCONN_ADMIN_TOKEN")
    if not token:
        raise ApiError("a token is needed: --token-file FILE or NATSCONN_ADMIN_TOKEN")
    _request(args.address, "POST", f"/pipelines/{args.name}/{args.action}", token)
    print(f"{args.name}: {args.action} accepted")
    return 0
