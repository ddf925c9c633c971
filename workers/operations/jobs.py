"""Finding jobs: the recent ones of a tenant (or everyone's), by task, status and time — what
``GET /api/v1/jobs`` and ``conveyor jobs`` both show."""

from __future__ import annotations

from typing import Any

from conveyor import jobindex
from conveyor.jobstatus import job_view, status_of
from conveyor.submitter import Submitter

#: Index entries read a page; pages read at most before giving up on more matches.
_PAGE = 200
_PAGES = 20


def recent_jobs(
    submitter: Submitter,
    tenant: str | None,
    *,
    task: str | None = None,
    status: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Newest first, at most ``limit``; ``tenant`` None: everyone's. Pages through the index
    until ``limit`` jobs match, reading at most ``_PAGES`` x ``_PAGE`` entries (a filter that
    matches rarely returns fewer rather than reading a day of jobs)."""
    found: list[dict[str, Any]] = []
    for offset in range(0, _PAGES * _PAGE, _PAGE):
        ids = jobindex.recent(
            submitter.redis,
            tenant,
            since_ms=since_ms,
            until_ms=until_ms,
            offset=offset,
            count=_PAGE,
        )
        entries = [e for e in jobindex.lookup(submitter.redis, ids) if e is not None]
        if task is not None:
            entries = [e for e in entries if e.task == task]
        metas = submitter.states([e.job_id for e in entries])
        for entry, meta in zip(entries, metas, strict=True):
            if status is None or status_of(meta) == status:
                found.append({**job_view(entry, meta), "tenant": entry.tenant})
                if len(found) == limit:
                    return found
        if len(ids) < _PAGE:
            break
    return found
