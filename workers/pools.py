"""The named worker pools: the task modules each loads, and the ``celery worker`` command line
that starts it. The numbers are ``workers.settings.pool``'s (overridable from the environment).
"""

from __future__ import annotations

from conveyor.names import AI, EPISODES, MAINTENANCE, N8N, QUEUES
from workers.settings import PoolSettings

#: Task modules each pool's workers import: a worker loads only what its pool runs, so one
#: family's code or configuration can never stop another family's workers.
POOL_TASK_MODULES: dict[str, tuple[str, ...]] = {
    AI: ("tasks.ai",),
    N8N: ("tasks.n8n",),
    EPISODES: ("tasks.episodes",),
    MAINTENANCE: ("tasks.maintenance",),
}

#: Every task module: what ``celery -A workers.app worker`` (no pool named) loads.
ALL_TASK_MODULES: tuple[str, ...] = tuple(m for name in QUEUES for m in POOL_TASK_MODULES[name])


def pool_names() -> list[str]:
    return list(QUEUES)


def worker_argv(spec: PoolSettings, *, hostname: str | None = None) -> list[str]:
    """Arguments for Celery's ``worker`` command that run pool ``spec``."""
    argv = [
        "worker",
        f"--queues={','.join(spec.queues)}",
        f"--pool={spec.pool}",
        f"--concurrency={spec.concurrency}",
        f"--prefetch-multiplier={spec.prefetch_multiplier}",
        f"--hostname={hostname or spec.name + '@%h'}",
        "--task-events",
        # Gossip and mingle cost Redis traffic at every start and buy us nothing: workers
        # share no state through them.
        "--without-gossip",
        "--without-mingle",
    ]
    if spec.pool in ("prefork", "solo"):
        argv += [
            f"--soft-time-limit={spec.soft_time_limit_s}",
            f"--time-limit={spec.time_limit_s}",
        ]
    if spec.max_memory_per_child_kb and spec.pool == "prefork":
        argv.append(f"--max-memory-per-child={spec.max_memory_per_child_kb}")
    return argv
