"""``episodes.record`` and the beat job that keeps ``episodic_logs`` from growing forever.

``episodes.record`` is a batched task (``workers.runtime.batching``): the episodes pool writes
records in batches of ``CONVEYOR_EPISODES_BATCH_SIZE`` (or whatever arrived within
``CONVEYOR_EPISODES_FLUSH_MS``), one round trip each, and acknowledges a message (one record,
or up to ``CONVEYOR_EPISODES_PACK`` packed by ``submit_many``) only after every record in it is
settled. It publishes no per-record events and keeps no success result:
at the rates episodes arrive, a stream and a result per record would cost Redis more than the
write itself. A record that fails for good (poison, or refused by Postgres) gets its
``episode_error`` event, a failed result and a row in ``dead_letters``.

``maintenance.episode_retention`` belongs to the maintenance queue (beat runs it hourly); it
lives here, beside the table it trims.
"""

from __future__ import annotations

from typing import Any

from conveyor.schemas.episodes import EpisodeRetentionPayload
from workers.app import app
from workers.episodes.writer import write_batch
from workers.runtime import connections
from workers.runtime.batching import BatchContext, Item, Verdict, batch_job
from workers.runtime.job import JobContext, job
from workers.store.episodes import delete_older_than


@batch_job("episodes.record", family="episodes")
def record(ctx: BatchContext, items: list[Item]) -> Verdict:
    """Write a batch of episodes: exactly one row per episode id."""
    return write_batch(ctx, items)


@job("maintenance.episode_retention", family="maintenance")
def episode_retention(ctx: JobContext, payload: EpisodeRetentionPayload) -> dict[str, Any]:
    """Delete episodes older than ``days`` (default ``CONVEYOR_EPISODE_RETENTION_DAYS``; 0 there
    keeps them forever), a chunk per short transaction, for at most half the pool's soft time
    limit: what is left goes at the next run."""
    conf = app.conf
    days = payload.days or conf.conveyor_episode_retention_days
    if not days:
        return {"deleted": 0, "finished": True, "retention_days": None}
    budget_s = conf.conveyor_pools["maintenance"]["soft_time_limit"] / 2
    result = delete_older_than(
        connections.engine(),
        days=days,
        chunk=conf.conveyor_episode_retention_chunk,
        budget_s=budget_s,
    )
    return {
        "deleted": result.deleted,
        "chunks": result.chunks,
        "finished": result.finished,
        "retention_days": days,
        "cutoff": result.cutoff.isoformat(),
    }
