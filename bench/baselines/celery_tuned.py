"""Celery tuned by hand, as ../shared/PEERS.md's "tuned" row: what a careful team sets.

Two ``-P solo`` processes (one per core, no pool IPC), prefetch 64 a process, acknowledged
after the task ran (``acks_late``, as Conveyor), results ignored and no task events (a peer
like Dramatiq or huey has neither), and no gossip, mingle or heartbeat (command line).

    celery -A bench.baselines.celery_tuned worker -P solo --prefetch-multiplier 64 \
        --without-gossip --without-mingle --without-heartbeat   # twice

(the harness's command line: ``bench.compare_parts.systems.TUNED_WORKER_ARGS``)
"""

from __future__ import annotations

from celery import Celery

from bench.baselines import stamps

QUEUE = "bench_tuned"

app = Celery("bench_celery_tuned", broker=stamps.redis_url())
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=64,
    task_ignore_result=True,
    worker_send_task_events=False,
    task_send_sent_event=False,
    task_serializer="json",
    accept_content=["json"],
)


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.stamp")
def stamp(key: str) -> None:
    stamps.stamp(key)
