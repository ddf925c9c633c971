"""The named worker pools and the ``celery worker`` command line that starts each.

The numbers live in ``celeryconfig.conveyor_pools`` (overridable from the environment); this
module turns one entry into arguments for Celery's worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.app import app


@dataclass(frozen=True)
class PoolSpec:
    name: str
    queues: tuple[str, ...]
    #: Celery pool implementation: threads, prefork, solo or gevent.
    pool: str
    concurrency: int
    prefetch_multiplier: int
    #: Seconds; enforced by prefork and solo only.
    soft_time_limit: int
    time_limit: int
    max_tasks_per_child: int | None = None

    def worker_argv(self, *, hostname: str | None = None) -> list[str]:
        argv = [
            "worker",
            f"--queues={','.join(self.queues)}",
            f"--pool={self.pool}",
            f"--concurrency={self.concurrency}",
            f"--prefetch-multiplier={self.prefetch_multiplier}",
            f"--hostname={hostname or self.name + '@%h'}",
            "--task-events",
            # Gossip and mingle cost Redis traffic at every start and buy us nothing: workers
            # share no state through them.
            "--without-gossip",
            "--without-mingle",
        ]
        if self.pool in ("prefork", "solo"):
            argv += [f"--soft-time-limit={self.soft_time_limit}", f"--time-limit={self.time_limit}"]
        if self.max_tasks_per_child and self.pool == "prefork":
            argv.append(f"--max-tasks-per-child={self.max_tasks_per_child}")
        return argv


def pool_names() -> list[str]:
    return list(app.conf.conveyor_pools)


def pool_spec(name: str) -> PoolSpec:
    pools = app.conf.conveyor_pools
    if name not in pools:
        raise KeyError(f"unknown pool {name!r}; pools: {', '.join(pools)}")
    entry = pools[name]
    return PoolSpec(
        name=name,
        queues=tuple(entry["queues"]),
        pool=entry["pool"],
        concurrency=entry["concurrency"],
        prefetch_multiplier=entry["prefetch_multiplier"],
        soft_time_limit=entry["soft_time_limit"],
        time_limit=entry["time_limit"],
        max_tasks_per_child=entry.get("max_tasks_per_child"),
    )
