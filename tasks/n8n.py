"""``n8n.execute``, and the beat job that finishes what it hands over.

Thin adapters over ``workers.n8n.workflows``: trigger a workflow once, follow it to its end (or
until the job's deadline), record the episode. ``maintenance.reconcile_workflows`` runs on the
maintenance pool (its task name routes it there) and lives here because it is n8n's.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import states

from conveyor.envelopes import FAMILIES, EventType, result_envelope
from conveyor.errors import JobFailed
from conveyor.names import queue_for
from conveyor.schemas.maintenance import NoPayload
from conveyor.schemas.n8n import N8nExecutePayload
from workers.app import app
from workers.episodes.outbox import log_episode
from workers.n8n import workflows
from workers.n8n.client import n8n_from_env
from workers.resilience.breakers import SharedBreaker
from workers.runtime import connections
from workers.runtime.job import JobContext, job, publisher
from workers.store import dead_letters
from workers.store.executions import ExecutionRow

#: Read when the worker loads its tasks, so a malformed N8N_* setting stops it at start.
#: None when N8N_BASE_URL is unset: an n8n job then fails with a clear, permanent error.
CLIENT = n8n_from_env()

_COMPONENT, _PREFIX = FAMILIES["n8n"]


@job("n8n.execute", family="n8n")
def execute(ctx: JobContext, payload: N8nExecutePayload) -> dict[str, Any]:
    """Run an n8n workflow through its webhook (never twice) and report how it ended."""
    return workflows.execute(
        runtime(),
        ctx.job_id,
        payload,
        progress=lambda data: ctx.emit("progress", data),
        episode=_record_episode,
    )


@job("maintenance.reconcile_workflows", family="maintenance")
def reconcile_workflows(ctx: JobContext, payload: NoPayload) -> dict[str, Any]:
    """Finishes executions still running when their job's deadline passed (beat, every 30 s)."""
    conf = app.conf
    if CLIENT is None:
        return {"skipped": "N8N_BASE_URL is not set on this worker"}
    counts = workflows.reconcile(
        runtime(),
        _ReconciledJobs(),
        grace_s=conf.conveyor_n8n_reconcile_grace_s,
        limit=conf.conveyor_n8n_reconcile_batch,
        # Half the pool's soft limit: the run ends well before Celery would interrupt it.
        budget_s=conf.conveyor_pools["maintenance"]["soft_time_limit"] / 2,
    )
    return {"executions": counts}


def runtime() -> workflows.Runtime:
    conf = app.conf
    # The threads pool cannot enforce time limits: stay within the soft one ourselves.
    hold_s = min(conf.conveyor_n8n_poll_hold_s, conf.conveyor_pools["n8n"]["soft_time_limit"])
    return workflows.Runtime(
        client=CLIENT,
        engine=connections.engine(),
        breaker=breaker(),
        settings=workflows.FollowSettings(
            poll_base_s=conf.conveyor_n8n_poll_base_s,
            poll_cap_s=conf.conveyor_n8n_poll_cap_s,
            hold_s=hold_s,
        ),
    )


@functools.cache
def breaker() -> SharedBreaker:
    """n8n's one circuit, shared by every worker through Redis."""
    conf = app.conf
    reset_s = conf.conveyor_n8n_breaker_reset_s
    longest_call_s = CLIENT.connect_timeout_s + CLIENT.read_timeout_s if CLIENT else 0.0
    return SharedBreaker(
        connections.redis_client(),
        "n8n",
        fail_max=conf.conveyor_n8n_breaker_fail_max,
        reset_timeout_s=reset_s,
        # A probe's lease outlives the longest call it may make (a synchronous workflow's run).
        probe_timeout_s=max(reset_s, longest_call_s + 5),
    )


def _record_episode(row: ExecutionRow) -> None:
    log_episode(row.job_id, **workflows.episode_fields(row))


class _ReconciledJobs:
    """Tells a handed-over job's listeners and waiters how it ended: its events (component
    ``workflow``), its result in the result backend (what ``Job.result()`` waits on), and its
    dead letter when it failed, exactly as the job itself would have."""

    def progress(self, row: ExecutionRow, data: dict[str, Any]) -> None:
        _publish(row.job_id, "update", "progress", {**data, "reconciled": True})

    def succeeded(self, row: ExecutionRow, data: dict[str, Any]) -> None:
        _record_episode(row)
        envelope = result_envelope(row.job_id, success=True, data=data)
        app.backend.store_result(row.job_id, envelope, states.SUCCESS)
        _publish(row.job_id, "complete", "complete", data)

    def failed(self, row: ExecutionRow, message: str, reason: str) -> None:
        if row.status != "outcome_unknown":
            _record_episode(row)
        queue = queue_for("n8n.execute")
        dead_letters.record(
            connections.engine(),
            connections.redis_client(),
            {
                "job_id": row.job_id,
                "task": "n8n.execute",
                "queue": queue,
                "payload": row.input,
                "reason": reason,
                "error": message,
                "attempts": 1,
            },
        )
        app.backend.store_result(row.job_id, JobFailed(message), states.FAILURE)
        _publish(row.job_id, "error", "error", {"error": message, "reason": reason})


def _publish(job_id: str, type: EventType, suffix: str, data: dict[str, Any]) -> None:
    publisher().publish(
        job_id, type=type, component=_COMPONENT, event=f"{_PREFIX}_{suffix}", data=data
    )
