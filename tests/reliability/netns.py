"""A detour through a network namespace, so that the kernel breaks a real link.

The servers listen on the host's loopback, where nothing can be shaped: a
namespace of our own, joined to the host by a veth pair, is put on the way::

    natsconn -> TcpProxy (127.0.0.1) -> 10.x.y.2:port  (the namespace: DNAT back
    to the host, masquerade; the faults act here, on every packet both ways)
    -> TcpProxy (10.x.y.1, the host's end of the veth) -> 127.0.0.1:server

Faults the kernel injects on the namespace's side of the link (``nft`` in its
forward chain, ``tc`` on its veth):

* ``loss(percent)``: each packet, either way, dropped with that probability;
* ``partition()``: every packet dropped until :meth:`heal` (connections stay
  open on both ends; TCP retransmits, as across a broken route);
* ``bandwidth(mbit)``: a token bucket on the link (both directions share it).

``latency``: this machine's kernel has no ``netem`` qdisc (``tc qdisc add ...
netem`` answers "Specified qdisc kind is unknown"; there are no modules to
load), so the delay and its jitter come from the host-side proxy
(:attr:`TcpProxy.latency`, pipelined, order kept) while the packets still take
the namespace's path.

Only what the detour created is touched: its namespace (deleting it removes the
veth pair and every rule with it). Needs root, ``ip`` and ``nft``
(``scripts/services`` installs nftables).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess

from connector.testing.proxy import TcpProxy

ENTRY_PORT = 7000  # the namespace's port that leads back to the server


def _run(*argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"network namespace: `{' '.join(argv)}` failed "
                           f"({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


class Detour:
    """One namespace and the two ends around it, for one server port on loopback."""

    def __init__(self, server_host: str, server_port: int) -> None:
        self.server_host = server_host
        self.server_port = server_port
        tag = secrets.token_hex(3)
        self.ns = f"ncx-{tag}"
        self.veth_host, self.veth_ns = f"ncx{tag}a", f"ncx{tag}b"
        third, fourth = secrets.randbelow(250) + 1, secrets.randbelow(63) * 4
        net = f"10.{200 + os.getpid() % 50}.{third}"
        self.host_ip, self.ns_ip = f"{net}.{fourth + 1}", f"{net}.{fourth + 2}"
        self.back: TcpProxy | None = None
        self.created = False
        self.fault = "none"
        self.dropped = 0  # packets the faults dropped, over the detour's life

    @property
    def entrance(self) -> tuple[str, int]:
        """Where the front proxy connects: the namespace's end of the link."""
        return self.ns_ip, ENTRY_PORT

    def _ns(self, *argv: str, stdin: str | None = None) -> str:
        return _run("ip", "netns", "exec", self.ns, *argv, stdin=stdin)

    def _dropped_now(self) -> int:
        """Packets dropped by the rules in the faults chain right now (its counters)."""
        out = json.loads(self._ns("nft", "-j", "list", "chain", "ip", "chaos", "faults"))
        total = 0
        for item in out.get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"].get("packets", 0))
        return total

    async def start(self) -> Detour:
        _run("ip", "netns", "add", self.ns)
        self.created = True
        try:
            _run("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
            _run("ip", "link", "set", self.veth_ns, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
            _run("ip", "link", "set", self.veth_host, "up")
            self._ns("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns)
            self._ns("ip", "link", "set", self.veth_ns, "up")
            self._ns("ip", "link", "set", "lo", "up")
            self._ns("sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.back = await TcpProxy(self.server_host, self.server_port,
                                       listen_host=self.host_ip).start()
            self._ns("nft", "-f", "-", stdin=(
                "table ip chaos {\n"
                "  chain pre { type nat hook prerouting priority -100; "
                f"tcp dport {ENTRY_PORT} dnat to {self.host_ip}:{self.back.port}; }}\n"
                f"  chain post {{ type nat hook postrouting priority 100; "
                f"oifname \"{self.veth_ns}\" masquerade; }}\n"
                "  chain faults { type filter hook forward priority 0; }\n"
                "}\n"))
        except BaseException:
            await self.close()
            raise
        return self

    # ------------------------------------------------------------------ faults

    def loss(self, percent: int) -> None:
        self.heal()
        self._ns("nft", "add", "rule", "ip", "chaos", "faults",
                 "numgen", "random", "mod", "100", "<", str(percent), "counter", "drop")
        self.fault = f"{percent}% loss"

    def partition(self) -> None:
        self.heal()
        self._ns("nft", "add", "rule", "ip", "chaos", "faults", "counter", "drop")
        self.fault = "partition"

    def bandwidth(self, mbit: int) -> None:
        self.heal()
        # burst: what the kernel needs for the rate at its timer's resolution; the
        # queue may hold 200 ms of traffic before packets are dropped (TCP slows down)
        self._ns("tc", "qdisc", "replace", "dev", self.veth_ns, "root", "tbf",
                 "rate", f"{mbit}mbit", "burst", "32kb", "latency", "200ms")
        self.fault = f"{mbit} Mbit/s"

    def latency(self, seconds: float, jitter: float) -> None:
        self.heal()
        assert self.back is not None
        self.back.latency, self.back.jitter = seconds, jitter
        self.fault = f"{seconds * 1000:g} ± {jitter * 1000:g} ms"

    def heal(self) -> None:
        """Every fault off; the link as it was."""
        self.dropped += self._dropped_now()
        self._ns("nft", "flush", "chain", "ip", "chaos", "faults")
        subprocess.run(["ip", "netns", "exec", self.ns, "tc", "qdisc", "del", "dev",
                        self.veth_ns, "root"], capture_output=True, check=False)
        if self.back is not None:
            self.back.latency = self.back.jitter = 0.0
        self.fault = "none"

    async def close(self) -> None:
        if self.back is not None:
            await self.back.close()
        if self.created:
            self.created = False
            await asyncio.to_thread(self._remove)

    def _remove(self) -> None:
        _run("ip", "netns", "del", self.ns)
        # the veth pair goes with the namespace; in case it is not, so it does
        subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True, check=False)
