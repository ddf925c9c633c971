"""The Celery app every worker, beat and Flower process runs.

``celery -A workers.app worker`` loads every task module; ``conveyor worker POOL`` narrows
``include`` to that pool's modules before the worker starts (``workers.pools``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, worker_process_init

from workers.pools import ALL_TASK_MODULES

#: Task modules a worker imports when no pool narrows them (kept for tests and tools).
TASK_MODULES = ALL_TASK_MODULES

app = Celery("conveyor", include=ALL_TASK_MODULES)
app.config_from_object("celeryconfig")
if str(app.conf.result_backend).startswith(("redis://", "rediss://", "unix://")):
    # A job's end stored in one round trip, not two (runtime/celery_internals.py).
    app.conf.result_backend = (
        "workers.runtime.celery_internals:ResultBackend+" + app.conf.result_backend
    )


#: Celery's loggers of one INFO line per job each ("received", "succeeded in"): two lines a
#: job is a measurable share of a busy worker's CPU, and Flower and the job's events say the
#: same. Kept at INFO with CONVEYOR_LOG_JOBS=1; warnings and errors always show.
_PER_JOB_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


@after_setup_logger.connect
def _quiet_per_job_lines(**_: Any) -> None:
    from workers import settings

    if not settings.core().log_jobs:
        for name in _PER_JOB_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    """A forked child must not reuse its parent's sockets (SQLAlchemy pool, Redis client)."""
    from workers.runtime import connections

    connections.reset()
