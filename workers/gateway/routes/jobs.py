"""Submitting jobs and asking after them: ``/api/v1/jobs``, the per-family shortcuts
(``/api/v1/ai/*``, ``/api/v1/workflow/*``) and ``POST /api/v1/db/logs``.

A body is read as raw JSON and validated by the library's own ``validate_payload``, so HTTP
callers get exactly the verdict a Python caller gets (NaN, NUL characters and 65-bit integers
included), naming every bad field.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from conveyor.envelopes import iso_ms
from conveyor.errors import ConveyorError, PayloadError
from conveyor.jobindex import Origin
from conveyor.jobstatus import STATUSES, job_view, result_of
from conveyor.schemas import SCHEMAS, schema_for
from conveyor.submitter import Job
from workers.gateway.access import gateway_of, not_found, owned_job
from workers.gateway.auth import ApiCaller, Caller
from workers.gateway.openapi import payload_body
from workers.gateway.responses import ApiError, ok
from workers.gateway.state import Gateway
from workers.operations.jobs import recent_jobs
from workers.store import executions
from workers.store.episodes import parse_time
from workers.store.executions import ExecutionRow

router = APIRouter(prefix="/api/v1", tags=["jobs"])

#: Idempotency keys: printable ASCII, as HTTP headers carry them.
_MAX_KEY = 255


class JobRequest(BaseModel):
    """Any public task by name."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(max_length=200, description="a public task name, e.g. ai.chat")
    payload: dict[str, Any] = Field(description="the task's payload (its schema by task name)")
    priority: int | None = Field(None, ge=0, le=9, description="0 (served first) .. 9")
    delay_s: float | None = Field(None, ge=0, allow_inf_nan=False, description="run later")


class BatchItem(JobRequest):
    idempotency_key: str | None = Field(None, min_length=1, max_length=_MAX_KEY)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[BatchItem] = Field(min_length=1)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from None


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip().strip('"')  # the draft sends it as a quoted string
    if not key or len(key) > _MAX_KEY or not key.isprintable() or not key.isascii():
        raise ApiError(
            400,
            f"Idempotency-Key must be 1-{_MAX_KEY} printable ASCII characters",
            problems=["header: Idempotency-Key: 1-255 printable ASCII characters"],
        )
    return key


def origin_of(request: Request, caller: Caller) -> Origin:
    return Origin(
        tenant=caller.tenant,
        request_id=request.state.request_id,
        traceparent=request.state.traceparent,
    )


def created(gw: Gateway, caller: Caller, job: Job) -> dict[str, Any]:
    path = f"/api/v1/jobs/{job.id}"
    return {
        "job_id": job.id,
        "task": job.task,
        "status": "queued",
        "duplicate": job.duplicate,
        "events_token": gw.tokens.sign(caller.tenant, job.id),
        "links": {"self": path, "events": f"{path}/events", "result": path},
    }


async def submit_one(
    request: Request,
    caller: Caller,
    task: str,
    payload: Any,
    *,
    priority: int | None = None,
    delay_s: float | None = None,
) -> JSONResponse:
    gw = gateway_of(request)
    key = idempotency_key(request)
    schema_for(task)
    await run_in_threadpool(gw.limit.charge, caller.key_id, 1)
    try:
        job = await run_in_threadpool(
            gw.submitter.submit,
            task,
            payload,
            idempotency_key=key,
            priority=priority,
            countdown=delay_s,
            origin=origin_of(request, caller),
        )
    except ValueError as exc:  # a priority or delay out of range (ours have their handlers)
        if isinstance(exc, ConveyorError):
            raise
        raise ApiError(400, str(exc), problems=[str(exc)]) from None
    return ok(
        request,
        created(gw, caller, job),
        status=202,
        headers={"Location": f"/api/v1/jobs/{job.id}"},
    )


def _task_route(task: str, path: str, summary: str) -> None:
    async def submit(request: Request, caller: ApiCaller) -> JSONResponse:
        return await submit_one(request, caller, task, await read_json(request))

    submit.__name__ = f"submit_{task.replace('.', '_')}"
    router.add_api_route(
        path,
        submit,
        methods=["POST"],
        status_code=202,
        summary=summary,
        openapi_extra=payload_body(SCHEMAS[task]),
        responses=_SUBMIT_RESPONSES,
    )


_SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid payload: data.problems names every bad field"},
    401: {"description": "no or unknown API key"},
    409: {"description": "the Idempotency-Key's first request is still being sent"},
    413: {"description": "the body is too large"},
    422: {"description": "the Idempotency-Key was used for another body"},
    429: {"description": "the key's rate limit is reached (Retry-After)"},
    503: {"description": "the broker is unreachable (Retry-After)"},
}

for _kind in ("generate", "chat", "code", "analyze"):
    _task_route(f"ai.{_kind}", f"/ai/{_kind}", f"ai.{_kind}: enqueue one")
_task_route("n8n.execute", "/workflow/execute", "n8n.execute: run a workflow")
_task_route("episodes.record", "/db/logs", "episodes.record: record an episode")


@router.post(
    "/jobs", status_code=202, summary="Enqueue any public task", responses=_SUBMIT_RESPONSES
)
async def submit_job(request: Request, body: JobRequest, caller: ApiCaller) -> JSONResponse:
    # The payload is taken from the raw body: pydantic would turn a NaN into null.
    raw = await read_json(request)
    return await submit_one(
        request, caller, body.task, raw["payload"], priority=body.priority, delay_s=body.delay_s
    )


@router.post(
    "/jobs/batch", status_code=202, summary="Enqueue many jobs", responses=_SUBMIT_RESPONSES
)
async def submit_batch(request: Request, body: BatchRequest, caller: ApiCaller) -> JSONResponse:
    """Every job is validated first: one bad job enqueues nothing. Jobs of one task are sent
    together (packed where the task packs). With an ``Idempotency-Key`` header, job *i* has the
    key ``<key>/<i>`` unless it names its own."""
    gw = gateway_of(request)
    if len(body.jobs) > gw.spec.max_batch:
        raise ApiError(
            400,
            f"a batch holds at most {gw.spec.max_batch} jobs, not {len(body.jobs)}",
            problems=[f"body: jobs: at most {gw.spec.max_batch} items"],
        )
    raw_jobs = (await read_json(request))["jobs"]
    header_key = idempotency_key(request)
    problems: list[str] = []
    for index, item in enumerate(body.jobs):
        try:
            gw.submitter.validate(item.task, raw_jobs[index]["payload"])
        except PayloadError as exc:
            problems += [f"body: jobs.{index}.payload: {p}" for p in exc.problems]
        except KeyError as exc:  # UnknownTaskError
            problems.append(f"body: jobs.{index}.task: {exc}")
    if problems:
        raise ApiError(400, "invalid jobs in the batch; nothing was enqueued", problems=problems)
    await run_in_threadpool(gw.limit.charge, caller.key_id, len(body.jobs))
    origin = origin_of(request, caller)
    groups: dict[tuple[str, int | None, float | None], list[int]] = {}
    for index, item in enumerate(body.jobs):
        groups.setdefault((item.task, item.priority, item.delay_s), []).append(index)
    made: dict[int, Job] = {}
    for (task, priority, delay_s), indexes in groups.items():
        keys = [
            body.jobs[i].idempotency_key or (f"{header_key}/{i}" if header_key else None)
            for i in indexes
        ]
        jobs = await run_in_threadpool(
            gw.submitter.submit_many,
            task,
            [raw_jobs[i]["payload"] for i in indexes],
            idempotency_keys=keys,
            priority=priority,
            countdown=delay_s,
            origin=origin,
        )
        made.update(zip(indexes, jobs, strict=True))
    return ok(
        request,
        {"jobs": [created(gw, caller, made[i]) for i in range(len(body.jobs))]},
        status=202,
    )


@router.get("/jobs", summary="The caller's recent jobs, newest first")
async def list_jobs(
    request: Request,
    caller: ApiCaller,
    task: str | None = Query(None, max_length=200),
    status: str | None = Query(None, description="|".join(STATUSES)),
    since: str | None = Query(None, description="ISO 8601, or 15m / 2h / 7d ago"),
    until: str | None = Query(None, description="ISO 8601, or 15m / 2h / 7d ago"),
    limit: int = Query(50, ge=1, le=500),
) -> JSONResponse:
    gw = gateway_of(request)
    if status is not None and status not in STATUSES:
        raise ApiError(
            400,
            f"status must be one of {', '.join(STATUSES)}",
            problems=[f"query: status: one of {', '.join(STATUSES)}"],
        )
    since_ms = _time_ms("since", since)
    until_ms = _time_ms("until", until)
    jobs = await run_in_threadpool(
        lambda: recent_jobs(
            gw.submitter,
            caller.tenant,
            task=task,
            status=status,
            since_ms=since_ms,
            until_ms=until_ms,
            limit=limit,
        )
    )
    return ok(request, {"jobs": jobs})


def _time_ms(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(parse_time(text).timestamp() * 1000)
    except ValueError as exc:
        raise ApiError(400, f"{name}: {exc}", problems=[f"query: {name}: {exc}"]) from None


@router.get("/jobs/{job_id}", summary="One job: its status and, once it ended, its result")
async def get_job(request: Request, job_id: str, caller: ApiCaller) -> JSONResponse:
    gw = gateway_of(request)
    entry = await owned_job(gw, caller, job_id)
    [meta] = await run_in_threadpool(gw.submitter.states, [job_id])
    view = job_view(entry, meta)
    view["result"] = result_of(job_id, meta, entry.request_id)
    view["links"] = {"events": f"/api/v1/jobs/{job_id}/events"}
    return ok(request, view)


@router.delete("/jobs/{job_id}", status_code=202, summary="Ask a job to stop")
async def cancel_job(request: Request, job_id: str, caller: ApiCaller) -> JSONResponse:
    gw = gateway_of(request)
    await owned_job(gw, caller, job_id)
    outcome = await run_in_threadpool(gw.submitter.cancel, job_id)
    if outcome == "finished":
        raise ApiError(409, f"job {job_id} has already ended; nothing to cancel")
    return ok(request, {"job_id": job_id, "cancel": outcome}, status=202)


@router.post("/jobs/{job_id}/token", summary="A token to follow this job's events")
async def job_token(request: Request, job_id: str, caller: ApiCaller) -> JSONResponse:
    gw = gateway_of(request)
    await owned_job(gw, caller, job_id)
    return ok(
        request,
        {
            "job_id": job_id,
            "events_token": gw.tokens.sign(caller.tenant, job_id),
            "expires_in_s": gw.tokens.ttl_s,
        },
    )


@router.get("/workflow/status/{job_id}", summary="An n8n.execute job and its n8n execution")
async def workflow_status(request: Request, job_id: str, caller: ApiCaller) -> JSONResponse:
    gw = gateway_of(request)
    entry = await owned_job(gw, caller, job_id)
    if entry.task != "n8n.execute":
        raise not_found(job_id)
    [meta] = await run_in_threadpool(gw.submitter.states, [job_id])
    row = await run_in_threadpool(executions.get, gw.engine, job_id)
    view = job_view(entry, meta)
    view["result"] = result_of(job_id, meta, entry.request_id)
    view["execution"] = None if row is None else _execution(row)
    return ok(request, view)


def _execution(row: ExecutionRow) -> dict[str, Any]:
    """The n8n run as stored (its input is the job's payload: the caller has it)."""
    stamp = {name: getattr(row, name) for name in ("triggered_at", "finished_at")}
    return {
        "workflow": row.workflow,
        "mode": row.mode,
        "n8n_execution_id": row.n8n_execution_id,
        "status": row.status,
        "finished": row.finished,
        "output": row.output,
        "error": row.error,
        "error_node": row.error_node,
        **{name: iso_ms(value) if value else None for name, value in stamp.items()},
    }
