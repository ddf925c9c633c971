"""Plain ASGI middleware (no buffering, so event streams flow): correlation ids on every
request, and a cap on request bodies.

A request id comes from ``X-Request-ID`` when it is 1-200 printable ASCII characters, else it
is made; it is echoed in the response's ``X-Request-ID``. A W3C ``traceparent`` is kept when
well-formed, else a new trace is started. Both go with every job the request submits.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.envelopes import utc_now_iso

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def request_id_from(value: str | None) -> str:
    if value and _REQUEST_ID.match(value):
        return value
    return uuid.uuid4().hex


def traceparent_from(value: str | None) -> str:
    """The caller's trace, continued; or a new one (version 00, sampled)."""
    if value:
        match = _TRACEPARENT.match(value.strip())
        if (
            match
            and match.group(1) != "ff"
            and match.group(2) != "0" * 32
            and match.group(3) != "0" * 16
        ):
            return value.strip()
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            try:
                return str(value.decode("latin-1"))
            except UnicodeDecodeError:
                return None
    return None


class Correlation:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_header(scope, b"x-request-id"))
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["traceparent"] = traceparent_from(_header(scope, b"traceparent"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


_SECRET_IN_QUERY = re.compile(r"((?:token|api_key)=)[^&\s\"]+")


class RedactQuerySecrets(logging.Filter):
    """uvicorn logs a WebSocket's path with its query ("WebSocket /api/v1/ws?token=…"):
    tokens never reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message or "api_key=" in message:
            record.msg, record.args = _SECRET_IN_QUERY.sub(r"\1***", message), ()
        return True


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the request body is over the limit of {limit} bytes")
        self.limit = limit


class BodyLimit:
    """Refuses a body over ``limit`` bytes: at once when its Content-Length says so, else as
    soon as the bytes read pass it (the route's handler answers 413)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            state = scope.get("state", {})
            body = {
                "success": False,
                "data": {},
                "error": str(BodyTooLarge(self.limit)),
                "timestamp": utc_now_iso(),
                "request_id": state.get("request_id", ""),
            }
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, receive if self.limit <= 0 else counted, send)
