"""Submitting jobs and asking after them: ``/api/v1/jobs``, the per-family shortcuts
(``/api/v1/ai/*``, ``/api/v1/workflow/*``) and ``POST /api/v1/db/logs``.

A body is read as raw JSON and validated by the library's own ``validate_payload``, so HTTP
callers get exactly the verdict a Python caller gets (NaN, NUL characters and 65-bit integers
included), naming every bad field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from conveyor.config import ClientConfig
from conveyor.envelopes import iso_ms
from conveyor.errors import ConveyorError, PayloadError
from conveyor.jobindex import Origin
from conveyor.jobstatus import STATUSES, job_view, result_of
from conveyor.schemas import SCHEMAS, schema_for
from conveyor.submitter import Job
from workers.gateway.access import gateway_of, not_found, owned_job
from workers.gateway.auth import ApiCaller, Caller
from workers.gateway.openapi import (
    REF,
    BatchAccepted,
    CancelAccepted,
    JobAccepted,
    Responses,
    answers,
    document_as,
    payload_body,
    reference,
    refusals,
)
from workers.gateway.responses import ApiError, ok
from workers.gateway.state import Gateway
from workers.operations.jobs import recent_jobs
from workers.store import executions
from workers.store.episodes import parse_time
from workers.store.executions import ExecutionRow

router = APIRouter(prefix="/api/v1", tags=["jobs"], responses=refusals(401, 503))

#: Idempotency keys: printable ASCII, as HTTP headers carry them.
_MAX_KEY = 255


class JobRequest(BaseModel):
    """Any public task by name."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"task": "ai.generate", "payload": {"prompt": "hi"}}]},
    )

    task: str = Field(max_length=200, description="a public task name, e.g. ai.chat")
    payload: dict[str, Any] = Field(description="the task's payload (its schema by task name)")
    priority: int | None = Field(None, ge=0, le=9, description="0 (served first) .. 9")
    delay_s: float | None = Field(None, ge=0, allow_inf_nan=False, description="run later")


class BatchItem(JobRequest):
    idempotency_key: str | None = Field(None, min_length=1, max_length=_MAX_KEY)


class BatchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "jobs": [
                        {"task": "maintenance.ping", "payload": {"message": "one"}},
                        {"task": "maintenance.ping", "payload": {"message": "two"}},
                        {"task": "ai.generate", "payload": {"prompt": "hi"}, "priority": 1},
                    ]
                }
            ]
        },
    )

    jobs: list[BatchItem] = Field(min_length=1)


def _by_task(model: type[JobRequest]) -> Callable[[], dict[str, Any]]:
    """``model``'s schema as the route checks it: one variant per public task, its
    ``payload`` that task's schema (FastAPI sees only an object), and ``delay_s`` at most the
    cap of this process's settings."""

    def schema() -> dict[str, Any]:
        base = model.model_json_schema(ref_template=REF)
        max_delay_s = ClientConfig.from_env().max_delay_s
        delay_s = {
            "anyOf": [{"type": "number", "minimum": 0, "maximum": max_delay_s}, {"type": "null"}],
            "description": f"run it this many seconds later: at most {max_delay_s:g} "
            "(CONVEYOR_VISIBILITY_TIMEOUT less the longest CONVEYOR_<POOL>_TIME_LIMIT)",
        }
        variant = {k: v for k, v in base.items() if k not in ("title", "description", "examples")}
        return {
            "title": base["title"],
            "description": "A public task by name, and that task's payload.",
            "examples": base.get("examples", []),
            "oneOf": [
                {
                    **variant,
                    "title": task,
                    "properties": {
                        **base["properties"],
                        "task": {"const": task},
                        "payload": {"$ref": reference(payload)},
                        "delay_s": delay_s,
                    },
                }
                for task, payload in sorted(SCHEMAS.items())
            ],
        }

    return schema


for _model in (JobRequest, BatchItem):
    document_as(_model.__name__, _by_task(_model))


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise ApiError(
            400, "the request body is empty; send a JSON object", problems=["body: empty"]
        )
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(
            400, "the request body nests too deeply", problems=["body: nests too deeply"]
        ) from None
    except ValueError as exc:
        raise ApiError(
            400, f"the request body is not JSON: {exc}", problems=[f"body: not JSON: {exc}"]
        ) from None


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


#: What a tenant may submit. The other public tasks are the operator's (``maintenance.*``
#: housekeeping runs over every tenant's data: retention deletes episodes, the reconciler and
#: the dead-letter flush act on everyone's rows); the operator (dev mode without keys) may send
#: any of them.
TENANT_TASKS = frozenset(
    {"ai.generate", "ai.chat", "ai.code", "ai.analyze", "n8n.execute", "episodes.record"}
    | {"maintenance.ping"}
)


def check_allowed(caller: Caller, task: str) -> None:
    if caller.tenant is not None and task not in TENANT_TASKS and task in SCHEMAS:
        raise ApiError(
            403,
            f"{task} is an operator's task; a tenant may submit " + ", ".join(sorted(TENANT_TASKS)),
        )


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
    check_allowed(caller, task)
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
        openapi_extra={**payload_body(SCHEMAS[task]), **_IDEMPOTENCY_KEY},
        responses=_SUBMIT_RESPONSES,
    )


_SUBMIT_REFUSALS = refusals(
    400, (409, "the Idempotency-Key's first request is still being sent (Retry-After)"), 422, 429
)
_SUBMIT_RESPONSES: Responses = {
    **answers(
        JobAccepted, 202, "enqueued (or, by its Idempotency-Key, enqueued before)", location=True
    ),
    **_SUBMIT_REFUSALS,
}
_IDEMPOTENCY_KEY: dict[str, Any] = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": f"1-{_MAX_KEY} printable ASCII characters: the same key and body "
            "within the idempotency window answer the same job, nothing enqueued",
            "schema": {"type": "string", "minLength": 1, "maxLength": _MAX_KEY},
        }
    ]
}

for _kind in ("generate", "chat", "code", "analyze"):
    _task_route(f"ai.{_kind}", f"/ai/{_kind}", f"ai.{_kind}: enqueue one")
_task_route("n8n.execute", "/workflow/execute", "n8n.execute: run a workflow")
_task_route("episodes.record", "/db/logs", "episodes.record: record an episode")


@router.post(
    "/jobs",
    status_code=202,
    summary="Enqueue any public task",
    responses=_SUBMIT_RESPONSES,
    openapi_extra=_IDEMPOTENCY_KEY,
)
async def submit_job(request: Request, body: JobRequest, caller: ApiCaller) -> JSONResponse:
    # The payload is taken from the raw body: pydantic would turn a NaN into null.
    raw = await read_json(request)
    return await submit_one(
        request, caller, body.task, raw["payload"], priority=body.priority, delay_s=body.delay_s
    )


@router.post(
    "/jobs/batch",
    status_code=202,
    summary="Enqueue many jobs",
    responses={**answers(BatchAccepted, 202, "every job enqueued"), **_SUBMIT_REFUSALS},
    openapi_extra=_IDEMPOTENCY_KEY,
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
    max_delay_s = gw.submitter.config.max_delay_s
    for index, item in enumerate(body.jobs):
        # The library refuses a delay past its cap too, but per task group, after the groups
        # before it were sent: checked here, a bad delay enqueues nothing.
        if item.delay_s is not None and item.delay_s > max_delay_s:
            problems.append(
                f"body: jobs.{index}.delay_s: at most {max_delay_s:g} s (schedule it later instead)"
            )
        try:
            gw.submitter.validate(item.task, raw_jobs[index]["payload"])
        except PayloadError as exc:
            problems += [f"body: jobs.{index}.payload: {p}" for p in exc.problems]
        except KeyError as exc:  # UnknownTaskError
            problems.append(f"body: jobs.{index}.task: {exc}")
    if problems:
        raise ApiError(400, "invalid jobs in the batch; nothing was enqueued", problems=problems)
    for item in body.jobs:
        check_allowed(caller, item.task)
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


@router.get(
    "/jobs",
    summary="The caller's recent jobs, newest first",
    responses={**answers(), **refusals(400)},
)
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


@router.get(
    "/jobs/{job_id}",
    summary="One job: its status and, once it ended, its result",
    responses={**answers(), **refusals(404)},
)
async def get_job(request: Request, job_id: str, caller: ApiCaller) -> JSONResponse:
    gw = gateway_of(request)
    entry = await owned_job(gw, caller, job_id)
    [meta] = await run_in_threadpool(gw.submitter.states, [job_id])
    view = job_view(entry, meta)
    view["result"] = result_of(job_id, meta, entry.request_id)
    view["links"] = {"events": f"/api/v1/jobs/{job_id}/events"}
    return ok(request, view)


@router.delete(
    "/jobs/{job_id}",
    status_code=202,
    summary="Ask a job to stop",
    responses={
        **answers(CancelAccepted, 202, "asked"),
        **refusals(404, (409, "the job has already ended: nothing to cancel")),
    },
)
async def cancel_job(request: Request, job_id: str, caller: ApiCaller) -> JSONResponse:
    gw = gateway_of(request)
    await owned_job(gw, caller, job_id)
    outcome = await run_in_threadpool(gw.submitter.cancel, job_id)
    if outcome == "finished":
        raise ApiError(409, f"job {job_id} has already ended; nothing to cancel")
    return ok(request, {"job_id": job_id, "cancel": outcome}, status=202)


@router.post(
    "/jobs/{job_id}/token",
    summary="A token to follow this job's events",
    responses={**answers(), **refusals(404)},
)
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


@router.get(
    "/workflow/status/{job_id}",
    summary="An n8n.execute job and its n8n execution",
    responses={**answers(), **refusals((404, "no such n8n.execute job (or another tenant's)"))},
)
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
