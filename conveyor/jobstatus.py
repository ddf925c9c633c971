"""How a job is doing, in words a caller can filter on, from Celery's result metadata and the
job index: ``queued``, ``running``, ``retrying``, ``succeeded``, ``failed``, ``cancelled``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from conveyor.envelopes import iso_ms, result_envelope
from conveyor.jobindex import IndexedJob

STATUSES = ("queued", "running", "retrying", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


def status_of(meta: dict[str, Any] | None) -> str:
    if meta is None:
        return "queued"
    state = meta.get("status")
    if state == "SUCCESS":
        result = meta.get("result")
        return "succeeded" if isinstance(result, dict) and result.get("success") else "failed"
    return {
        "STARTED": "running",
        "RETRY": "retrying",
        "FAILURE": "failed",
        "REVOKED": "cancelled",
    }.get(str(state), "queued")


def result_of(
    job_id: str, meta: dict[str, Any] | None, request_id: str | None = None
) -> dict[str, Any] | None:
    """The result envelope of a finished job; None while it has not finished."""
    status = status_of(meta)
    if meta is None or status not in FINISHED:
        return None
    result = meta.get("result")
    if meta.get("status") == "SUCCESS" and isinstance(result, dict) and "success" in result:
        return result
    if status == "cancelled":
        error = "cancelled"
    elif isinstance(result, dict) and "exc_message" in result:
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(m) for m in message)
        error = f"{result.get('exc_type', 'error')}: {message}"
    else:
        error = f"job ended without a result envelope: {result!r}"
    done = meta.get("date_done")
    return result_envelope(
        job_id, success=False, error=error, timestamp=_stamp(done), request_id=request_id
    )


def _stamp(done: Any) -> str | None:
    """Celery's ``date_done`` (an ISO string in a Redis backend, naive or not) as ours."""
    if isinstance(done, str):
        try:
            done = datetime.fromisoformat(done)
        except ValueError:
            return None
    return iso_ms(done) if isinstance(done, datetime) else None


def job_view(entry: IndexedJob, meta: dict[str, Any] | None) -> dict[str, Any]:
    """A job as the gateway and ``conveyor status`` show it."""
    return {
        "job_id": entry.job_id,
        "task": entry.task,
        "status": status_of(meta),
        "submitted_at": iso_ms(datetime.fromtimestamp(entry.submitted_at_ms / 1000, UTC)),
        "request_id": entry.request_id,
        "retry_of": entry.retry_of,
    }
