"""Sending a job's message from inside another job (an ``ai`` job's episode), through the
worker's own Celery app and its pooled broker connections. Family code reaches the app only
through here."""

from __future__ import annotations

from typing import Any

from conveyor.names import queue_for
from workers.app import app


def send(task_name: str, message: dict[str, Any]) -> None:
    """Send ``message`` (``conveyor.messages.message_for``) of the public task ``task_name``
    to its queue."""
    queue = queue_for(task_name)
    app.send_task(task_name, queue=queue, routing_key=queue, **message)
