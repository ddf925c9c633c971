"""Episodes: ``GET /api/v1/db/logs`` queries them with ``conveyor episodes``' filters (recording
one is a job: ``POST /api/v1/db/logs`` in ``routes.jobs``)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from workers.gateway.access import gateway_of
from workers.gateway.auth import ApiCaller
from workers.gateway.openapi import answers, refusals
from workers.gateway.responses import ApiError, ok
from workers.store.episodes import BadCursor, parse_time, query_episodes

router = APIRouter(prefix="/api/v1", tags=["episodes"], responses=refusals(401, 503))


@router.get(
    "/db/logs",
    summary="Episodes, newest first, a page at a time",
    responses={**answers(), **refusals(400)},
)
async def episodes(
    request: Request,
    caller: ApiCaller,
    user_id: str | None = Query(None, max_length=1000),
    session_id: str | None = Query(None, max_length=1000),
    model_type: str | None = Query(None, max_length=1000),
    status: str | None = Query(None, max_length=100),
    since: str | None = Query(None, description="ISO 8601, or 15m / 2h / 7d ago"),
    until: str | None = Query(None, description="ISO 8601, or 15m / 2h / 7d ago"),
    q: str | None = Query(None, description="web-search syntax over prompt and response"),
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=1000, description="next_cursor of a page"),
) -> JSONResponse:
    gw = gateway_of(request)
    problems = []
    times = {}
    for name, text in (("since", since), ("until", until)):
        if text is not None:
            try:
                times[name] = parse_time(text)
            except ValueError as exc:
                problems.append(f"query: {name}: {exc}")
    for name, value in (("user_id", user_id), ("session_id", session_id), ("q", q)):
        if value is not None and "\x00" in value:
            problems.append(f"query: {name}: contains a NUL character")
    if problems:
        raise ApiError(400, "invalid query", problems=problems)
    try:
        page = await run_in_threadpool(
            query_episodes,
            gw.engine,
            tenant=caller.tenant,
            user_id=user_id,
            session_id=session_id,
            model_type=model_type,
            status=status,
            since=times.get("since"),
            until=times.get("until"),
            search=q,
            limit=limit,
            cursor=cursor,
        )
    except BadCursor as exc:
        raise ApiError(400, str(exc), problems=[f"query: cursor: {exc}"]) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), problems=[f"query: {exc}"]) from None
    return ok(request, {"episodes": page.episodes, "next_cursor": page.next_cursor})
