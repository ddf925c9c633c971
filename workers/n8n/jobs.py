"""The n8n family's jobs as plain code: ``n8n.execute`` and the reconciler beat runs.

``execute`` triggers a workflow once and follows it (``workflows``); ``reconcile`` finishes
what a job handed over at its deadline, reporting each end through ``runtime.outcome`` exactly
as the job itself would have. The instance comes from ``workers.settings.n8n()``: the n8n pool
checks it at start; the maintenance pool's reconciler reads it when it runs and, when it is
malformed, skips and says why, so n8n's configuration never stops another pool.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from conveyor.errors import ConfigError
from conveyor.names import MAINTENANCE, N8N
from conveyor.schemas.n8n import N8nExecutePayload
from workers import settings
from workers.episodes.outbox import log_episode
from workers.n8n import reconcile, workflows
from workers.n8n.client import N8nClient
from workers.resilience.breakers import SharedBreaker
from workers.runtime import connections, outcome
from workers.runtime.context import JobContext
from workers.store.executions import ExecutionRow

log = logging.getLogger(__name__)

TASK = "n8n.execute"


def execute(ctx: JobContext, payload: N8nExecutePayload) -> dict[str, Any]:
    """Run an n8n workflow through its webhook (never twice) and report how it ended."""
    return workflows.execute(
        runtime(),
        ctx.job_id,
        payload,
        progress=lambda data: ctx.emit("progress", data),
        episode=record_episode,
    )


def reconcile_pass() -> dict[str, Any]:
    """One reconciler pass (beat, every 30 s): finishes executions still running when their
    job's deadline passed."""
    try:
        config = settings.n8n()
    except ConfigError as exc:
        log.error("reconcile_workflows skipped: %s", exc)
        return {"skipped": f"n8n's settings are malformed: {exc}"}
    if config.instance is None:
        return {"skipped": "N8N_BASE_URL is not set on this worker"}
    counts = reconcile.reconcile(
        runtime(),
        ReconciledJobs(),
        grace_s=config.reconcile_grace_s,
        limit=config.reconcile_batch,
        # Half the pool's soft limit: the run ends well before Celery would interrupt it.
        budget_s=settings.pool(MAINTENANCE).soft_time_limit_s / 2,
    )
    return {"executions": counts}


@functools.cache
def client() -> N8nClient | None:
    """The process's n8n client; None when ``N8N_BASE_URL`` is unset."""
    instance = settings.n8n().instance
    return instance.client() if instance else None


def runtime() -> workflows.Runtime:
    config = settings.n8n()
    # The threads pool cannot enforce time limits: stay within the soft one ourselves.
    hold_s = min(config.poll_hold_s, settings.pool(N8N).soft_time_limit_s)
    return workflows.Runtime(
        client=client(),
        engine=connections.engine(),
        breaker=breaker(),
        settings=workflows.FollowSettings(
            poll_base_s=config.poll_base_s, poll_cap_s=config.poll_cap_s, hold_s=hold_s
        ),
    )


@functools.cache
def breaker() -> SharedBreaker:
    """n8n's one circuit, shared by every worker through Redis."""
    config = settings.n8n()
    n8n = client()
    longest_call_s = n8n.connect_timeout_s + n8n.read_timeout_s if n8n else 0.0
    return SharedBreaker(
        connections.redis_client(),
        "n8n",
        fail_max=config.breaker_fail_max,
        reset_timeout_s=config.breaker_reset_s,
        # A probe's lease outlives the longest call it may make (a synchronous workflow's run).
        probe_timeout_s=max(config.breaker_reset_s, longest_call_s + 5),
    )


def record_episode(row: ExecutionRow) -> None:
    log_episode(row.job_id, **workflows.episode_fields(row))


class ReconciledJobs:
    """Tells a handed-over job's listeners and waiters how it ended: its events (component
    ``workflow``), its result (what ``Job.result()`` waits on), and its dead letter when it
    failed, through ``runtime.outcome`` as the job itself would have."""

    def progress(self, row: ExecutionRow, data: dict[str, Any]) -> None:
        JobContext(row.job_id, TASK, 0, N8N).emit("progress", {**data, "reconciled": True})

    def succeeded(self, row: ExecutionRow, data: dict[str, Any]) -> None:
        record_episode(row)
        outcome.settle(row.job_id, TASK, N8N, data)

    def failed(self, row: ExecutionRow, message: str, reason: str) -> None:
        if row.status != "outcome_unknown":
            record_episode(row)
        outcome.fail(
            row.job_id,
            TASK,
            row.input,
            outcome.Ending(reason, message, 1),
            queue=N8N,
            family=N8N,
            store_result=True,
        )
