"""The periodic jobs, as data. Every entry expires: a tick that waited past its own interval
(a stalled pool) is dropped rather than piled up behind the next one.

Beat runs under celery-redbeat, whose Redis lock keeps a second beat from firing the same tick.
"""

from __future__ import annotations


def every(seconds: float, task: str, payload: dict | None = None) -> dict:
    """An entry that runs ``task`` every ``seconds`` and expires after 1.5 intervals."""
    return {
        "task": task,
        "schedule": seconds,
        "args": (payload or {},),
        "options": {"expires": seconds * 1.5},
    }


BEAT_SCHEDULE: dict[str, dict] = {
    "queue-metrics": every(15.0, "maintenance.queue_metrics"),
    "flush-dead-letters": every(60.0, "maintenance.flush_dead_letters"),
    "reconcile-workflows": every(30.0, "maintenance.reconcile_workflows"),
    "episode-retention": every(3600.0, "maintenance.episode_retention"),
}
