"""The job index: who submitted each job, which task, when — so a tenant can list its own jobs
and be refused another's, and an operator can find recent work without Flower.

Written by the submitter in the same round trip that settles its idempotency keys; read by
the gateway and ``conveyor jobs|status``. Celery's result backend says how a job is doing;
this says whose it is. Entries live as long as results do (``CONVEYOR_RESULT_TTL``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from conveyor import keys


@dataclass(frozen=True)
class Origin:
    """Who asked for a job and how to trace it. It travels in the job's message headers into
    its events, its log lines and its dead letter.

    ``tenant`` scopes idempotency keys and who may see the job (None: submitted by a trusted
    service, seen by operators only); ``request_id`` and ``traceparent`` (W3C) correlate it
    with the request that made it; ``retry_of`` names the dead letter it re-submits."""

    tenant: str | None = None
    request_id: str | None = None
    traceparent: str | None = None
    retry_of: str | None = None

    @classmethod
    def from_headers(cls, get: Any) -> Origin:
        """The origin a received message carries; ``get(name)`` reads one header (absent or
        not text: None, so a hand-made message cannot break a job with odd headers)."""

        def text(name: str) -> str | None:
            value = get(name)
            return value if isinstance(value, str) and value else None

        return cls(
            tenant=text(HEADER_TENANT),
            request_id=text(HEADER_REQUEST_ID),
            traceparent=text(HEADER_TRACEPARENT),
            retry_of=text(HEADER_RETRY_OF),
        )

    def headers(self) -> dict[str, str]:
        """The message headers that carry it (absent fields are left out)."""
        found = {
            HEADER_TENANT: self.tenant,
            HEADER_REQUEST_ID: self.request_id,
            HEADER_TRACEPARENT: self.traceparent,
            HEADER_RETRY_OF: self.retry_of,
        }
        return {name: value for name, value in found.items() if value}


#: Message headers of a job's origin (Celery copies custom headers onto ``task.request``).
HEADER_TENANT = "conveyor_tenant"
HEADER_REQUEST_ID = "conveyor_request_id"
HEADER_TRACEPARENT = "traceparent"
HEADER_RETRY_OF = "conveyor_retry_of"


@dataclass(frozen=True)
class IndexedJob:
    job_id: str
    task: str
    tenant: str | None
    submitted_at_ms: int
    request_id: str | None = None
    traceparent: str | None = None
    retry_of: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "task": self.task,
            "tenant": self.tenant,
            "submitted_at_ms": self.submitted_at_ms,
            "request_id": self.request_id,
            "traceparent": self.traceparent,
            "retry_of": self.retry_of,
        }


def record(
    pipe: Any, task: str, job_ids: Sequence[str], origin: Origin | None, *, ttl_s: int
) -> None:
    """Queue the index writes of newly sent jobs on ``pipe`` (a redis-py pipeline)."""
    if not job_ids:
        return
    origin = origin or Origin()
    now_ms = int(time.time() * 1000)
    entry = json.dumps(
        {
            "task": task,
            "tenant": origin.tenant,
            "at": now_ms,
            "request_id": origin.request_id,
            "traceparent": origin.traceparent,
            "retry_of": origin.retry_of,
        },
        separators=(",", ":"),
    )
    for job_id in job_ids:
        pipe.set(keys.job(job_id), entry, ex=ttl_s)
    listings = {keys.tenant_jobs(None), keys.tenant_jobs(origin.tenant)}
    for listing in listings:
        pipe.zadd(listing, {job_id: now_ms for job_id in job_ids})
        pipe.zremrangebyscore(listing, "-inf", now_ms - ttl_s * 1000)
        pipe.expire(listing, ttl_s)


def visible(entry: IndexedJob | None, tenant: str | None) -> bool:
    """Whether a caller acting for ``tenant`` may see the job (None: the operator, who sees
    every tenant's)."""
    return entry is not None and (tenant is None or entry.tenant == tenant)


def lookup(client: redis.Redis, job_ids: Sequence[str]) -> list[IndexedJob | None]:
    """The index entries of ``job_ids``, in order (None: unknown, or expired)."""
    if not job_ids:
        return []
    values: Any = client.mget([keys.job(job_id) for job_id in job_ids])
    found: list[IndexedJob | None] = []
    for job_id, value in zip(job_ids, values, strict=True):
        if value is None:
            found.append(None)
            continue
        entry = json.loads(value)
        found.append(
            IndexedJob(
                job_id=job_id,
                task=entry["task"],
                tenant=entry.get("tenant"),
                submitted_at_ms=int(entry["at"]),
                request_id=entry.get("request_id"),
                traceparent=entry.get("traceparent"),
                retry_of=entry.get("retry_of"),
            )
        )
    return found


def recent(
    client: redis.Redis,
    tenant: str | None,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    offset: int = 0,
    count: int = 100,
) -> list[str]:
    """Ids of the tenant's jobs submitted in [since, until], newest first (``tenant`` None:
    everyone's)."""
    high = "+inf" if until_ms is None else until_ms
    low = "-inf" if since_ms is None else since_ms
    ids: Any = client.zrevrangebyscore(keys.tenant_jobs(tenant), high, low, start=offset, num=count)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
