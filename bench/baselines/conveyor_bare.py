"""A bare task on Conveyor's Celery settings (``celeryconfig``), without the job wrapper.

The same settings every Conveyor worker runs with (acks_late, prefetch 1, results and STARTED
state stored, task events, priority lists, Conveyor's consumer), and tasks that do nothing
else: what the settings cost before any of Conveyor's own code runs. The harness starts it
with ``workers.pools.worker_argv`` of the maintenance pool, so its worker command is
``conveyor worker maintenance``'s.

Needs the environment a Conveyor process needs (REDIS_URL, CELERY_BROKER_URL, ...).
"""

from __future__ import annotations

from celery import Celery

from bench.baselines import stamps

#: One of Conveyor's declared queues (celeryconfig refuses to create others).
QUEUE = "maintenance"

app = Celery("bench_conveyor_bare")
app.config_from_object("celeryconfig")
app.conf.include = ()


@app.task(name="bench.bare_noop")
def noop() -> None:
    return None


@app.task(name="bench.bare_stamp")
def stamp(key: str) -> None:
    stamps.stamp(key)
