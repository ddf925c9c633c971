"""The gateway's ASGI app: ``uvicorn --factory workers.gateway.app:create_app``, or
``conveyor gateway``. Routes are in ``routes/``; the live page is ``ui/``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from workers import settings
from workers.gateway import openapi
from workers.gateway.middleware import (
    BodyLimit,
    BodyTooLarge,
    Correlation,
    RedactQuerySecrets,
)
from workers.gateway.responses import ApiError, error_response, install_error_handlers
from workers.gateway.routes import dead_letters, events, health, jobs, logs
from workers.gateway.state import Gateway

UI = Path(__file__).parent / "ui"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    gateway = Gateway.open()
    app.state.gateway = gateway
    await gateway.hub.start()
    try:
        yield
    finally:
        await gateway.close()


def create_app() -> FastAPI:
    spec = settings.check_gateway()  # a malformed setting stops the start, naming it
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactQuerySecrets())
    app = FastAPI(
        title="Conveyor gateway",
        version="1",
        description="Submit jobs, follow their events, query episodes and dead letters. "
        "Every answer is the envelope {success, data, error, timestamp, request_id}.",
        lifespan=_lifespan,
    )
    install_error_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(request, ApiError(413, str(exc)))

    for module in (jobs, events, logs, dead_letters, health):
        app.include_router(module.router, responses=openapi.refusals(413))  # BodyLimit's
    openapi.install(app)
    app.mount("/ui", StaticFiles(directory=UI, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def _root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.add_middleware(BodyLimit, limit=spec.max_body_bytes)
    app.add_middleware(Correlation)  # outermost: every answer carries the request id
    return app
