"""Decentralised NATS auth for the tests: operator, account and user JWTs made
here with the ``nkeys`` package, and a nats-server in operator mode of the
test's own.

A NATS JWT is ``base64url(header) . base64url(claims) . base64url(signature)``
without padding: the header is ``{"typ": "JWT", "alg": "ed25519-nkey"}``, the
claims are JSON with ``iss`` (the signer's public NKey), ``sub`` (the subject's
public NKey), ``iat``, optional ``exp``, ``jti`` (base32 of the SHA-512/256 of
the standard claims, ``jti`` left out) and a ``nats`` object whose ``type`` is
``operator``, ``account`` or ``user`` (claims ``version`` 2). The signature is
the issuer's ed25519 signature of ``header.claims``. The operator signs itself
and the accounts, an account its users. An account revokes a user by listing
its public key in ``nats.revocations`` with a time: user JWTs issued at or
before it are refused. The server trusts the operator (``operator:``) and
learns the accounts from ``resolver_preload`` (``resolver: MEMORY``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys
from integration.nats_dedicated import _free_port, nats_server_from

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_UNLIMITED = -1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Key:
    """An NKey pair: ``seed`` (S...) and ``public`` (O..., A..., U...)."""

    seed: str
    public: str

    @classmethod
    def new(cls, prefix: int) -> Key:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed.decode(), nkeys.from_seed(seed).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        signature: bytes = nkeys.from_seed(self.seed.encode()).sign(data)
        return signature


def encode_jwt(issuer: Key, subject: str, name: str, nats: dict[str, Any],
               issued_at: int | None = None, expires: int | None = None) -> str:
    """A JWT of ``nats`` claims about ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {"iat": issued_at if issued_at is not None else int(time.time()),
                              "iss": issuer.public, "name": name, "sub": subject}
    if expires is not None:
        claims["exp"] = expires
    # jti: a hash of the standard claims (as nats-io/jwt does), unique per token.
    standard = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    claims["jti"] = base64.b32encode(hashlib.new("sha512_256", standard).digest()
                                     ).rstrip(b"=").decode()
    claims["nats"] = {**nats, "version": 2}
    head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = issuer.sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(signature)}"


def decode_claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return claims


def creds_text(user_jwt: str, user_seed: str) -> str:
    """A .creds file as ``nsc generate creds`` writes it."""
    return (f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


@dataclass
class Operator:
    """An operator with one account (JetStream on, no limits) and its users."""

    directory: Path
    operator: Key = field(default_factory=lambda: Key.new(nkeys.PREFIX_BYTE_OPERATOR))
    account: Key = field(default_factory=lambda: Key.new(nkeys.PREFIX_BYTE_ACCOUNT))
    # The server's own account; JetStream does not start without one in operator mode.
    system: Key = field(default_factory=lambda: Key.new(nkeys.PREFIX_BYTE_ACCOUNT))
    revocations: dict[str, int] = field(default_factory=dict)

    def operator_jwt(self) -> str:
        return encode_jwt(self.operator, self.operator.public, "natsconn-test-operator",
                          {"type": "operator", "system_account": self.system.public})

    def system_jwt(self) -> str:
        limits = {"subs": _UNLIMITED, "data": _UNLIMITED, "payload": _UNLIMITED,
                  "imports": _UNLIMITED, "exports": _UNLIMITED, "wildcards": True,
                  "conn": _UNLIMITED, "leaf": _UNLIMITED}
        return encode_jwt(self.operator, self.system.public, "SYS",
                          {"type": "account", "limits": limits})

    def account_jwt(self) -> str:
        limits = {"subs": _UNLIMITED, "data": _UNLIMITED, "payload": _UNLIMITED,
                  "imports": _UNLIMITED, "exports": _UNLIMITED, "wildcards": True,
                  "conn": _UNLIMITED, "leaf": _UNLIMITED,
                  # JetStream is on for an account whose storage limits are not 0.
                  "mem_storage": _UNLIMITED, "disk_storage": _UNLIMITED,
                  "streams": _UNLIMITED, "consumer": _UNLIMITED}
        nats: dict[str, Any] = {"type": "account", "limits": limits,
                                "default_permissions": {"pub": {}, "sub": {}}}
        if self.revocations:
            nats["revocations"] = dict(self.revocations)
        return encode_jwt(self.operator, self.account.public, "natsconn-test-account", nats)

    def user(self, name: str, *, expires: int | None = None,
             issued_at: int | None = None) -> tuple[Key, Path]:
        """A user of the account and its .creds file (mode 0600)."""
        user = Key.new(nkeys.PREFIX_BYTE_USER)
        token = encode_jwt(self.account, user.public, name,
                           {"type": "user", "pub": {}, "sub": {}, "subs": _UNLIMITED,
                            "data": _UNLIMITED, "payload": _UNLIMITED},
                           issued_at=issued_at, expires=expires)
        path = self.directory / f"{name}.creds"
        path.write_text(creds_text(token, user.seed), encoding="utf-8")
        path.chmod(0o600)
        return user, path

    def revoke(self, user: Key, at: int | None = None) -> None:
        """User JWTs of ``user`` issued at or before ``at`` (now) are refused."""
        self.revocations[user.public] = at if at is not None else int(time.time())

    def server_config(self, port: int, store: Path) -> str:
        operator_file = self.directory / "operator.jwt"
        operator_file.write_text(self.operator_jwt(), encoding="utf-8")
        return (f"listen: 127.0.0.1:{port}\n"
                f"operator: \"{operator_file}\"\n"
                f"system_account: {self.system.public}\n"
                "resolver: MEMORY\n"
                f"resolver_preload: {{\n  {self.account.public}: \"{self.account_jwt()}\"\n"
                f"  {self.system.public}: \"{self.system_jwt()}\"\n}}\n"
                f"jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n"
                "  max_file_store: 1GB\n}\n")


@contextlib.asynccontextmanager
async def operator_mode_server(op: Operator, timeout: float = 20.0) -> AsyncIterator[str]:
    """A nats-server trusting ``op``'s operator, the account preloaded (with the
    revocations made before this call); yields its ``nats://`` URL."""
    op.directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = op.directory / "nats-jwt.conf"
    conf.write_text(op.server_config(port, op.directory / "jetstream"), encoding="utf-8")
    log_path = op.directory / "nats-jwt.log"
    async with nats_server_from(conf, port, log_path, "operator-mode", timeout) as url:
        yield url
