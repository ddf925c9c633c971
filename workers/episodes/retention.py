"""Keeping ``episodic_logs`` from growing forever: ``maintenance.episode_retention``'s work."""

from __future__ import annotations

from typing import Any

from conveyor.names import MAINTENANCE
from workers import settings
from workers.runtime import connections
from workers.store.episodes import delete_older_than


def run(days: int | None) -> dict[str, Any]:
    """Delete episodes older than ``days`` (default ``CONVEYOR_EPISODE_RETENTION_DAYS``; 0 there
    keeps them forever), a chunk per short transaction, for at most half the maintenance pool's
    soft time limit: what is left goes at the next run."""
    config = settings.episodes()
    days = days or config.retention_days
    if not days:
        return {"deleted": 0, "finished": True, "retention_days": None}
    result = delete_older_than(
        connections.engine(),
        days=days,
        chunk=config.retention_chunk,
        budget_s=settings.pool(MAINTENANCE).soft_time_limit_s / 2,
    )
    return {
        "deleted": result.deleted,
        "chunks": result.chunks,
        "finished": result.finished,
        "retention_days": days,
        "cutoff": result.cutoff.isoformat(),
    }
