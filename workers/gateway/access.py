"""What a caller may reach: its own jobs, by id; anything else is 404, exactly like an id that
does not exist (a tenant learns nothing of another's jobs, not even that they exist). A caller
of no tenant (dev mode without keys) is the operator, and sees every tenant's."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from conveyor import jobindex
from conveyor.jobindex import IndexedJob
from workers.gateway.auth import Caller
from workers.gateway.responses import ApiError
from workers.gateway.state import Gateway


def gateway_of(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def not_found(job_id: str) -> ApiError:
    return ApiError(404, f"no job {job_id}")


async def owned_job(gw: Gateway, caller: Caller, job_id: str) -> IndexedJob:
    if len(job_id) > 200 or not caller.may_see(job_id):
        raise not_found(job_id[:200])
    [entry] = await run_in_threadpool(jobindex.lookup, gw.redis, [job_id])
    if entry is None or not jobindex.visible(entry, caller.tenant):
        raise not_found(job_id)
    return entry
