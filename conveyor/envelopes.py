"""The event and result envelopes of DESIGN.md: what dashboards and callers read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

EventType = Literal["update", "error", "complete"]

#: Event families: component and the prefix of their event names.
#: ``maintenance`` is ours (the first job); the other three are DESIGN.md's.
FAMILIES: dict[str, tuple[str, str]] = {
    "ai": ("ai", "ai_generation"),
    "n8n": ("workflow", "workflow_execution"),
    "episodes": ("logging", "episode"),
    "maintenance": ("maintenance", "maintenance"),
}

#: What an event says of its job: ``<prefix>_<suffix>``, e.g. ``ai_generation_progress``.
EventSuffix = Literal["start", "progress", "complete", "error"]


def event_name(family: str, suffix: EventSuffix) -> str:
    """The one place an event name is spelled: ``event_name("n8n", "error")`` is
    ``workflow_execution_error``."""
    return f"{FAMILIES[family][1]}_{suffix}"


def component_of(family: str) -> str:
    """The ``component`` field of a family's events (``n8n`` -> ``workflow``)."""
    return FAMILIES[family][0]


#: Event types that end a job's stream: a follower stops after one of them.
TERMINAL_TYPES = frozenset({"complete", "error"})


def iso_ms(when: datetime) -> str:
    """``2026-11-22T10:00:00.000Z``: milliseconds, UTC, the form dashboards parse. A time
    without a zone is taken as UTC (Celery's ``date_done`` is naive UTC)."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def utc_now_iso() -> str:
    return iso_ms(datetime.now(UTC))


def result_envelope(
    job_id: str,
    *,
    success: bool,
    data: dict[str, Any] | None = None,
    error: str | None = None,
    timestamp: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """``request_id``: the request that made the job (the gateway's ``X-Request-ID``); the
    job's id when no request made it."""
    return {
        "success": success,
        "data": data if data is not None else {},
        "error": error,
        "timestamp": timestamp or utc_now_iso(),
        "request_id": request_id or job_id,
    }
