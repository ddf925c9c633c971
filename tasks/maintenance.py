"""``maintenance.*``: the first job, and the jobs beat runs (see beat_schedule.py)."""

from __future__ import annotations

import time
from typing import Any

from conveyor import keys
from conveyor.names import QUEUES
from conveyor.schemas.maintenance import NoPayload, PingPayload
from workers.app import app
from workers.observability.queues import queue_lengths
from workers.runtime import connections
from workers.runtime.job import JobContext, job
from workers.store import dead_letters


@job("maintenance.ping", family="maintenance")
def ping(ctx: JobContext, payload: PingPayload) -> dict[str, Any]:
    """Proves the whole path: submit -> queue -> worker -> result -> events."""
    deadline = time.monotonic() + payload.hold_s
    while (left := deadline - time.monotonic()) > 0:
        ctx.progress(holding_s=round(left, 1))
        time.sleep(min(1.0, left))
    return {"pong": payload.message, "worker": ctx.hostname, "attempt": ctx.attempt + 1}


@job("maintenance.queue_metrics", family="maintenance")
def queue_metrics(ctx: JobContext, payload: NoPayload) -> dict[str, Any]:
    """Publishes queue lengths to a Redis hash that autoscalers and dashboards read."""
    options = app.conf.broker_transport_options
    client = connections.redis_client()
    lengths = queue_lengths(
        client, QUEUES, priority_steps=options["priority_steps"], sep=options["sep"]
    )
    client.hset(keys.QUEUE_METRICS, mapping={**lengths, "at": time.time()})
    return {"queues": lengths}


@job("maintenance.flush_dead_letters", family="maintenance")
def flush_dead_letters(ctx: JobContext, payload: NoPayload) -> dict[str, Any]:
    """Moves dead letters spilled to Redis during a Postgres outage into ``dead_letters``."""
    moved = dead_letters.flush_spill(connections.engine(), connections.redis_client())
    return {"moved": moved}
