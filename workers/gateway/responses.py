"""Every answer in DESIGN.md's response envelope, and the one table of errors to status codes.

Routes raise; the handlers installed by ``install_error_handlers`` answer. An error a caller
can fix names what to fix; nothing a caller sends makes a 500 (an unforeseen exception is
logged with its request id and answered 500 without its text).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.envelopes import utc_now_iso
from conveyor.errors import (
    ConveyorError,
    IdempotencyConflict,
    IdempotencyKeyInFlight,
    PayloadError,
    UnknownTaskError,
)

log = logging.getLogger(__name__)

#: Seconds a client should wait before retrying while the broker or database is away.
UNAVAILABLE_RETRY_AFTER_S = 5


class ApiError(Exception):
    """An answer other than success: its status, a message for people, and for a 400 the
    list of every bad field (the message itself when the raiser names none)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        problems: list[str] | None = None,
        headers: dict[str, str] | None = None,
        data: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = [message] if status == 400 and not problems else problems
        self.headers = headers or {}
        self.data = data


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


def envelope(
    request: Request, data: dict[str, Any] | None = None, *, error: str | None = None
) -> dict[str, Any]:
    return {
        "success": error is None,
        "data": data if data is not None else {},
        "error": error,
        "timestamp": utc_now_iso(),
        "request_id": request_id_of(request),
    }


def ok(
    request: Request,
    data: dict[str, Any],
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(envelope(request, data), status_code=status, headers=headers)


def error_response(request: Request, exc: ApiError) -> JSONResponse:
    data = dict(exc.data or {})
    if exc.problems is not None:
        data["problems"] = exc.problems
    return JSONResponse(
        envelope(request, data, error=exc.message), status_code=exc.status, headers=exc.headers
    )


def unavailable(what: str) -> ApiError:
    return ApiError(
        503,
        f"{what} is unreachable; retry later",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
    )


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, rest = parts[0], parts[1:]
        return f"{where}: " + ".".join(rest) if rest else where
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """The one table of what becomes which status."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        content_type = request.headers.get("content-type", "")
        if request.method in ("POST", "PUT", "PATCH") and "json" not in content_type:
            problems.append(
                f"header: Content-Type: send the body as JSON with Content-Type: "
                f"application/json, not {content_type or 'none'}"
            )
        for error in exc.errors():
            where = _location(tuple(error.get("loc", ())))
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return error_response(request, ApiError(400, "invalid request", problems=problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(
            request, ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
        )

    @app.exception_handler(PayloadError)
    async def _payload(request: Request, exc: PayloadError) -> JSONResponse:
        return error_response(
            request, ApiError(400, f"invalid payload for {exc.task}", problems=exc.problems)
        )

    @app.exception_handler(UnknownTaskError)
    async def _unknown_task(request: Request, exc: UnknownTaskError) -> JSONResponse:
        return error_response(request, ApiError(400, str(exc), problems=[f"task: {exc}"]))

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        return error_response(request, ApiError(422, str(exc)))

    @app.exception_handler(IdempotencyKeyInFlight)
    async def _in_flight(request: Request, exc: IdempotencyKeyInFlight) -> JSONResponse:
        return error_response(request, ApiError(409, str(exc), headers=retry_after_header(1)))

    @app.exception_handler(ConveyorError)
    async def _conveyor(request: Request, exc: ConveyorError) -> JSONResponse:
        # What is left of ConveyorError: the broker or Redis could not be reached.
        log.warning("request %s: %s", request_id_of(request), exc)
        return error_response(request, unavailable("the broker"))

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("request %s: Redis: %s", request_id_of(request), exc)
        return error_response(request, unavailable("Redis"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        from sqlalchemy.exc import DBAPIError

        if (isinstance(exc, DBAPIError) and exc.connection_invalidated) or _is_db_down(exc):
            log.warning("request %s: database: %s", request_id_of(request), exc)
            return error_response(request, unavailable("the database"))
        log.exception("request %s failed", request_id_of(request))
        return error_response(request, ApiError(500, "internal error; see the gateway's log"))


def _is_db_down(exc: Exception) -> bool:
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return isinstance(exc, OperationalError | PoolTimeout)
