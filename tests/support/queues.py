"""Looking at and emptying the broker's queues directly in Redis."""

from __future__ import annotations

import json

import celeryconfig
from workers.observability.queues import queue_keys


def _keys(queue: str) -> list[str]:
    options = celeryconfig.broker_transport_options
    return queue_keys(queue, options["priority_steps"], options["sep"])


def messages(redis_client, queue: str) -> list[dict]:
    """Every message waiting in ``queue`` (all priorities), decoded."""
    found = []
    for key in _keys(queue):
        found += [json.loads(raw) for raw in redis_client.lrange(key, 0, -1)]
    return found


def purge(redis_client, *queues: str) -> None:
    for queue in queues:
        redis_client.delete(*_keys(queue))
