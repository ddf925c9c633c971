"""``maintenance.*``: the first job, and the jobs beat runs (see beat_schedule.py)."""

from __future__ import annotations

from typing import Any

from conveyor.schemas.episodes import EpisodeRetentionPayload
from conveyor.schemas.maintenance import NoPayload, PingPayload
from workers.episodes import retention
from workers.maintenance import jobs as maintenance
from workers.n8n import jobs as n8n_jobs
from workers.runtime.job import JobContext, job


@job("maintenance.ping", family="maintenance")
def ping(ctx: JobContext, payload: PingPayload) -> dict[str, Any]:
    """Proves the whole path: submit -> queue -> worker -> result -> events."""
    return maintenance.ping(ctx, payload)


# Beat's frequent housekeeping sends no task events: it would fill Flower's task list (three
# quarters of it, every 15-60 s) and hide the jobs people look for. Its failures still go to
# dead_letters; the hourly retention job stays visible.
@job("maintenance.queue_metrics", family="maintenance", send_events=False)
def queue_metrics(ctx: JobContext, payload: NoPayload) -> dict[str, Any]:
    """Publishes queue lengths to a Redis hash that autoscalers and dashboards read."""
    return {"queues": maintenance.publish_queue_lengths()}


@job("maintenance.flush_dead_letters", family="maintenance", send_events=False)
def flush_dead_letters(ctx: JobContext, payload: NoPayload) -> dict[str, Any]:
    """Moves dead letters spilled to Redis during a Postgres outage into ``dead_letters``."""
    return {"moved": maintenance.flush_dead_letters()}


@job("maintenance.reconcile_workflows", family="maintenance", send_events=False)
def reconcile_workflows(ctx: JobContext, payload: NoPayload) -> dict[str, Any]:
    """Finishes n8n executions still running when their job's deadline passed (every 30 s)."""
    return n8n_jobs.reconcile_pass()


@job("maintenance.episode_retention", family="maintenance")
def episode_retention(ctx: JobContext, payload: EpisodeRetentionPayload) -> dict[str, Any]:
    """Deletes episodes older than ``days`` (default ``CONVEYOR_EPISODE_RETENTION_DAYS``)."""
    return retention.run(payload.days)
