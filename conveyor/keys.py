"""Every Redis key Conveyor itself writes, named in one place.

Celery's and kombu's own keys (queues, ``unacked``, ``celery-task-meta-*``) are theirs;
these are ours. All of ours start with ``conveyor:`` and all but the dead-letter spill carry a TTL.
"""

from __future__ import annotations

PREFIX = "conveyor"


def events_channel(job_id: str) -> str:
    """Pub/sub channel of one job's events, for live listeners."""
    return f"{PREFIX}:events:{job_id}"


def events_stream(job_id: str) -> str:
    """Capped stream of one job's events, for listeners that join late and replay."""
    return f"{PREFIX}:stream:{job_id}"


def events_seq(job_id: str) -> str:
    """Counter behind the ``seq`` of one job's events."""
    return f"{PREFIX}:seq:{job_id}"


#: Pattern a dashboard subscribes to (PSUBSCRIBE) to follow every job.
EVENTS_PATTERN = f"{PREFIX}:events:*"


def idempotency(tenant: str | None, key: str) -> str:
    """Maps a caller's idempotency key to the job it created, for the idempotency window.
    One key space per tenant (``-``: jobs submitted with no tenant), across every task: a key
    is one ask, and the same key with another task is another ask (a conflict)."""
    return f"{PREFIX}:idem:{tenant or '-'}:{key}"


def job(job_id: str) -> str:
    """The job index: who submitted a job, which task, when (a hash, with a TTL)."""
    return f"{PREFIX}:job:{job_id}"


def tenant_jobs(tenant: str | None) -> str:
    """A tenant's jobs by submit time (a sorted set: job id scored by epoch ms); ``None``:
    every job, whoever's (the operator's view)."""
    return f"{PREFIX}:jobs:{tenant}" if tenant else f"{PREFIX}:jobs:*"


def deliveries(job_id: str, attempt: int) -> str:
    """How many times one attempt of a job was delivered: caps redelivery of poison."""
    return f"{PREFIX}:deliveries:{job_id}:{attempt}"


def cancel(job_id: str) -> str:
    """Set (with a TTL) to ask a job to stop: checked when it starts and while it streams.
    Unlike Celery's revoke it outlives a worker restart."""
    return f"{PREFIX}:cancel:{job_id}"


#: Dead letters that could not be written to Postgres wait here (a list of JSON objects)
#: until ``maintenance.flush_dead_letters`` moves them. No TTL: nothing is dropped.
DEAD_LETTER_SPILL = f"{PREFIX}:dead_letters:spill"
#: Held (with a TTL) by the one process moving the spill to Postgres.
DEAD_LETTER_FLUSH_LOCK = f"{PREFIX}:dead_letters:flush-lock"

#: Latest queue lengths, a hash written by ``maintenance.queue_metrics``.
QUEUE_METRICS = f"{PREFIX}:metrics:queues"


# ---------------------------------------------------------------------------------------------
# Shared circuit breakers and rate limits (``workers/resilience/``).
# One hash per upstream, changed only by Lua scripts on that one key, so every transition is
# atomic across the fleet (and cluster-safe). Times inside are Redis server time in ms, so
# workers with skewed clocks agree.


def breaker(upstream: str) -> str:
    """Circuit-breaker state of one upstream (an LLM provider, n8n), shared by every worker.

    Hash fields: ``state`` (``closed`` | ``open`` | ``half-open``; absent = closed),
    ``failures`` (consecutive system failures), ``gen`` (bumped at every transition and every
    probe granted, so an outcome reported late never acts on a newer state), ``opened_at_ms``,
    ``retry_at_ms`` (when the next probe may go: end of the open period, or expiry of the
    running probe's lease), ``successes`` (pybreaker's success counter). The TTL (at least a
    day, refreshed on every write) only forgets an idle breaker, which is then closed.
    """
    return f"{PREFIX}:breaker:{upstream}"


def ratelimit(upstream: str) -> str:
    """Rate-limit state (GCRA) of one upstream, shared by every worker.

    Hash fields: ``req_tat`` and ``tok_tat``, the theoretical arrival time of the requests and
    tokens budgets (a budget is full when its TAT is not in the future). Expires once both
    budgets are full again, which is the same as no state.
    """
    return f"{PREFIX}:ratelimit:{upstream}"
