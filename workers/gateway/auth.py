"""Who is calling: an API key bound to a tenant, or a short-lived token for one job's events.

Keys are configured as their sha256 digests (``CONVEYOR_GATEWAY_KEYS``), so the gateway never
holds a key it could leak; a request's key is hashed and looked up. A token is the tenant, the
job and an expiry, signed with HMAC-SHA256 (``CONVEYOR_GATEWAY_SECRET``): a browser can follow
its own job's events without holding the key that submitted it, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from workers.gateway.responses import ApiError

#: The tenant of every request in dev mode when no key is configured: none, the operator's
#: view (every tenant's jobs, episodes and dead letters, and those submitted without one).
DEV_TENANT = None


@dataclass(frozen=True)
class Caller:
    tenant: str | None
    #: Names the key without revealing it (a digest prefix): rate limits and logs use it.
    key_id: str
    #: A token's one job; None for an API key (every job of the tenant).
    job_scope: str | None = None

    def may_see(self, job_id: str) -> bool:
        return self.job_scope is None or self.job_scope == job_id


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh API key: 256 random bits, recognisable by its prefix."""
    return "cvk_" + secrets.token_urlsafe(32)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    """Signs and checks job-scoped event tokens."""

    def __init__(self, secret: str | None, ttl_s: int):
        # Dev mode without a configured secret: one per process (tokens die with it).
        self._secret = (secret or secrets.token_urlsafe(32)).encode()
        self.ttl_s = ttl_s

    def sign(self, tenant: str | None, job_id: str) -> str:
        body = _b64(
            json.dumps(
                {"t": tenant, "j": job_id, "e": int(time.time()) + self.ttl_s},
                separators=(",", ":"),
            ).encode()
        )
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str, job_id: str) -> Caller:
        """The caller a token stands for; 401 when forged, malformed or expired, 403 when it
        is for another job."""
        body, _, mac = token.partition(".")
        if (
            not body
            or not mac
            or not hmac.compare_digest(
                mac.encode("utf-8", "surrogatepass"), self._mac(body).encode()
            )
        ):
            raise ApiError(401, "the token is not valid", headers=_challenge())
        try:
            claims = json.loads(_unb64(body))
            tenant = None if claims["t"] is None else str(claims["t"])
            scope, expires = str(claims["j"]), int(claims["e"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(401, "the token is not valid", headers=_challenge()) from None
        if expires < time.time():
            raise ApiError(401, "the token has expired; ask for a new one", headers=_challenge())
        if scope != job_id:
            raise ApiError(403, "the token is for another job")
        return Caller(tenant=tenant, key_id=f"token:{scope[:8]}", job_scope=scope)

    def _mac(self, body: str) -> str:
        raw = body.encode("utf-8", "surrogatepass")
        return _b64(hmac.new(self._secret, raw, hashlib.sha256).digest())


def _challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="conveyor"'}


class KeyRing:
    """The configured keys: digest -> tenant."""

    def __init__(self, key_tenants: dict[str, str], *, dev: bool):
        self._tenants = dict(key_tenants)
        #: No keys in dev mode: every request is the dev tenant's.
        self.open = dev and not self._tenants

    def caller(self, key: str | None) -> Caller:
        if key:
            digest = hash_key(key)
            tenant = self._tenants.get(digest)
            if tenant is not None:
                return Caller(tenant=tenant, key_id=digest[:16])
            raise ApiError(401, "unknown API key", headers=_challenge())
        if self.open:
            return Caller(tenant=DEV_TENANT, key_id="dev")
        raise ApiError(
            401,
            "an API key is required: Authorization: Bearer <key> (or X-API-Key)",
            headers=_challenge(),
        )


def presented_key(request_headers: Mapping[str, str], query_key: str | None = None) -> str:
    """The key a request presents: ``Authorization: Bearer``, ``X-API-Key``, or (WebSocket
    from a browser, which cannot set headers) ``?api_key=``; empty when none."""
    get = request_headers.get
    auth = get("authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (get("x-api-key") or query_key or "").strip()


def api_caller(request: Request) -> Caller:
    """FastAPI dependency: the caller of a route that needs an API key."""
    ring: KeyRing = request.app.state.gateway.keys
    return ring.caller(presented_key(request.headers))


#: A route parameter that is the calling API key's ``Caller``.
ApiCaller = Annotated[Caller, Depends(api_caller)]
