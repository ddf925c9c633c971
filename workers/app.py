"""The Celery app every worker, beat and Flower process runs.

``celery -A workers.app worker`` loads every task module; ``conveyor worker POOL`` narrows
``include`` to that pool's modules before the worker starts (``workers.pools``).
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from workers.pools import ALL_TASK_MODULES

#: Task modules a worker imports when no pool narrows them (kept for tests and tools).
TASK_MODULES = ALL_TASK_MODULES

app = Celery("conveyor", include=ALL_TASK_MODULES)
app.config_from_object("celeryconfig")


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    """A forked child must not reuse its parent's sockets (SQLAlchemy pool, Redis client)."""
    from workers.runtime import connections

    connections.reset()
