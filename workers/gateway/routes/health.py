"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from workers.gateway.access import gateway_of
from workers.gateway.openapi import answers, refusals
from workers.gateway.responses import envelope, ok
from workers.gateway.state import Gateway

router = APIRouter(tags=["health"])


@router.get("/health", summary="The process is up (it checks nothing else)", responses=answers())
async def health(request: Request) -> JSONResponse:
    return ok(request, {"status": "ok"})


@router.get(
    "/ready",
    summary="The broker and the database are reachable",
    responses={**answers(), **refusals((503, "data.down names what is unreachable"))},
)
async def ready(request: Request) -> JSONResponse:
    gw = gateway_of(request)
    down = await run_in_threadpool(_unreachable, gw)
    if down:
        body = envelope(request, {"down": down}, error=f"unreachable: {', '.join(down)}")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return ok(request, {"status": "ready"})


def _unreachable(gw: Gateway) -> list[str]:
    down = []
    try:
        gw.redis.ping()
    except Exception:
        down.append("redis")
    try:
        with gw.submitter.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception:
        down.append("broker")
    try:
        with gw.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        down.append("database")
    return down
