"""Plain Celery with its defaults: what anyone gets from ``Celery(broker=...)``.

Nothing is configured but the broker: queue ``celery``, prefork pool with one process per core,
prefetch multiplier 4, early acknowledgement (``task_acks_late`` off), no result backend
(results are not stored), no task events, gossip, mingle and heartbeats on.

    celery -A bench.baselines.celery_defaults worker --concurrency 2
"""

from __future__ import annotations

from celery import Celery

from bench.baselines import stamps

QUEUE = "celery"

app = Celery("bench_celery_defaults", broker=stamps.redis_url())


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.stamp")
def stamp(key: str) -> None:
    stamps.stamp(key)
