"""The ``maintenance`` family's own jobs as plain code: the first job, queue metrics, and the
dead letters spilled to Redis during a Postgres outage. (Beat's other jobs belong to their
families: n8n's reconciler, episodes' retention.)"""

from __future__ import annotations

import time
from typing import Any

from conveyor import keys
from conveyor.config import broker_transport_options
from conveyor.names import QUEUES
from conveyor.schemas.maintenance import PingPayload
from workers import settings
from workers.observability.queues import queue_lengths
from workers.runtime import connections
from workers.runtime.context import JobContext
from workers.store import dead_letters


def ping(ctx: JobContext, payload: PingPayload) -> dict[str, Any]:
    """Proves the whole path: holds ``hold_s`` seconds (a progress event a second), answers."""
    deadline = time.monotonic() + payload.hold_s
    while (left := deadline - time.monotonic()) > 0:
        ctx.progress(holding_s=round(left, 1))
        time.sleep(min(1.0, left))
    return {"pong": payload.message, "worker": ctx.hostname, "attempt": ctx.attempt + 1}


def publish_queue_lengths() -> dict[str, int]:
    """Every queue's length into the ``conveyor:metrics:queues`` hash (with ``at``)."""
    options = broker_transport_options(settings.core().visibility_timeout_s)
    client = connections.redis_client()
    lengths = queue_lengths(
        client, QUEUES, priority_steps=options["priority_steps"], sep=options["sep"]
    )
    metrics: dict[str, float] = {**lengths, "at": time.time()}
    client.hset(keys.QUEUE_METRICS, mapping=metrics)  # type: ignore[arg-type]
    return lengths


def flush_dead_letters() -> int:
    """Dead letters moved from the Redis spill list into Postgres."""
    return dead_letters.flush_spill(connections.engine(), connections.redis_client())
