"""Dead letters: list, inspect, re-submit, purge — a tenant's own only (the twin of
``conveyor dead-letters``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from workers.gateway.access import gateway_of
from workers.gateway.auth import ApiCaller
from workers.gateway.openapi import answers, refusals
from workers.gateway.responses import ApiError, ok
from workers.operations.dead_letters import (
    AlreadyResubmitted,
    DeadLetterNotFound,
    retry_dead_letters,
)
from workers.store import dead_letters

router = APIRouter(prefix="/api/v1", tags=["dead letters"], responses=refusals(401, 503))

_TIME = "ISO 8601, or 15m / 2h / 7d ago"


class RetryRequest(BaseModel):
    """One dead letter by its job id, or every one a filter matches (not yet re-submitted)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, max_length=200)
    task: str | None = Field(None, max_length=200)
    reason: str | None = Field(None, max_length=100)
    since: str | None = Field(None, max_length=100, description=_TIME)
    until: str | None = Field(None, max_length=100, description=_TIME)
    dry_run: bool = False
    limit: int = Field(1000, ge=1, le=1000)


def _bad(exc: ValueError) -> ApiError:
    return ApiError(400, str(exc), problems=[str(exc)])


@router.get(
    "/dead-letters",
    summary="Dead letters, newest first",
    responses={**answers(), **refusals(400)},
)
async def list_dead_letters(
    request: Request,
    caller: ApiCaller,
    task: str | None = Query(None, max_length=200),
    reason: str | None = Query(None, max_length=100),
    since: str | None = Query(None, max_length=100, description=_TIME),
    until: str | None = Query(None, max_length=100, description=_TIME),
    limit: int = Query(100, ge=1, le=1000),
) -> JSONResponse:
    gw = gateway_of(request)
    try:
        rows = await run_in_threadpool(
            lambda: dead_letters.list_dead_letters(
                gw.engine,
                tenant=caller.tenant,
                task=_clean("query: task", task),
                reason=_clean("query: reason", reason),
                since=since,
                until=until,
                limit=limit,
            )
        )
    except ValueError as exc:
        raise _bad(exc) from None
    return ok(request, {"dead_letters": rows})


def _clean(where: str, text: str | None) -> str | None:
    if text is not None and "\x00" in text:
        raise ApiError(
            400, "a filter contains a NUL character", problems=[f"{where}: a NUL character"]
        )
    return text


@router.get(
    "/dead-letters/{job_id}",
    summary="One dead letter, with its payload",
    responses={**answers(), **refusals(400, (404, "no such dead letter (or another tenant's)"))},
)
async def get_dead_letter(request: Request, job_id: str, caller: ApiCaller) -> JSONResponse:
    gw = gateway_of(request)
    row = await run_in_threadpool(
        lambda: dead_letters.get_dead_letter(
            gw.engine, _clean("path: job_id", job_id) or "", tenant=caller.tenant
        )
    )
    if row is None:
        raise ApiError(404, f"no dead letter with job id {job_id}")
    return ok(request, row)


@router.post(
    "/dead-letters/retry",
    summary="Submit dead letters again (each new job names its dead letter)",
    responses={
        **answers(),
        **refusals(
            400,
            (404, "no dead letter with that job id (or another tenant's)"),
            (409, "that dead letter was re-submitted already: data.resubmitted_job_id"),
        ),
    },
)
async def retry(request: Request, body: RetryRequest, caller: ApiCaller) -> JSONResponse:
    gw = gateway_of(request)
    for name in ("job_id", "task", "reason", "since", "until"):
        _clean(f"body: {name}", getattr(body, name))

    def run() -> list[dict[str, Any]]:
        return retry_dead_letters(
            gw.engine,
            gw.submitter,
            tenant=caller.tenant,
            job_id=body.job_id,
            task=body.task,
            reason=body.reason,
            since=body.since,
            until=body.until,
            dry_run=body.dry_run,
            limit=body.limit,
            request_id=request.state.request_id,
            traceparent=request.state.traceparent,
        )

    try:
        results = await run_in_threadpool(run)
    except DeadLetterNotFound as exc:
        raise ApiError(404, str(exc)) from None
    except AlreadyResubmitted as exc:
        raise ApiError(409, str(exc), data={"resubmitted_job_id": exc.resubmitted_job_id}) from None
    except ValueError as exc:
        raise _bad(exc) from None
    return ok(request, {"retried": results, "dry_run": body.dry_run})


@router.delete(
    "/dead-letters",
    summary="Purge dead letters that failed before a time",
    responses={**answers(), **refusals(400)},
)
async def purge(
    request: Request,
    caller: ApiCaller,
    before: str = Query(..., max_length=100, description=_TIME),
    dry_run: bool = Query(False),
) -> JSONResponse:
    gw = gateway_of(request)
    try:
        count = await run_in_threadpool(
            lambda: dead_letters.purge_dead_letters(
                gw.engine, before=before, tenant=caller.tenant, dry_run=dry_run
            )
        )
    except ValueError as exc:
        raise _bad(exc) from None
    return ok(request, {"purged": 0 if dry_run else count, "would_purge": count if dry_run else 0})
