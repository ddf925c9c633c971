"""The Celery app every worker, beat and Flower process runs."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

#: Task modules the workers import; one per job family.
TASK_MODULES = ("tasks.maintenance", "tasks.ai", "tasks.n8n", "tasks.episodes")

app = Celery("conveyor", include=TASK_MODULES)
app.config_from_object("celeryconfig")


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    """A forked child must not reuse its parent's sockets (SQLAlchemy pool, Redis client)."""
    from workers.runtime import connections

    connections.reset()
