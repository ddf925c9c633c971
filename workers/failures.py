"""One error taxonomy and one place that decides what a failure means.

Clients of the outside world raise ``Retryable`` (with an optional delay, e.g. from
``Retry-After``) or ``Permanent``. ``classify`` maps everything else: outages of the
infrastructure we depend on are retryable, anything unknown is permanent — retrying a bug
only hides it. ``workers.runtime.job`` turns the verdict into a Celery retry or a dead letter.
"""

from __future__ import annotations

import random
from typing import Any

import redis
import requests
import sqlalchemy.exc
from celery.exceptions import SoftTimeLimitExceeded


class Retryable(Exception):
    """Worth trying again later; ``delay_s`` when the failure said how long to wait."""

    def __init__(self, message: str, *, delay_s: float | None = None):
        super().__init__(message)
        self.delay_s = delay_s


class Deferred(Retryable):
    """Not now, and not the job's fault (its provider's circuit is open): run it again after
    ``delay_s`` without spending one of its retries."""

    def __init__(self, message: str, *, delay_s: float):
        super().__init__(message, delay_s=delay_s)


class Permanent(Exception):
    """Trying again cannot help (a caller's 4xx, a bad payload, a workflow that failed)."""

    reason = "permanent"


class Cancelled(Permanent):
    """Someone asked for the job to stop (``conveyor cancel``): not a failure to dead-letter."""

    reason = "cancelled"


class Poison(Permanent):
    """The message itself is unusable: it fails its schema, or kills every worker it meets."""

    reason = "poison"


class HandedOver(Exception):
    """Not a failure: the job stops here and another job reports its end (an n8n workflow
    still running at the job's deadline goes to ``maintenance.reconcile_workflows``). No result
    now, no terminal event, no dead letter; ``data`` goes into the progress event that says so."""

    def __init__(self, message: str, *, data: dict[str, Any] | None = None):
        super().__init__(message)
        self.data = data or {}


#: Infrastructure failures: an outage delays work, it does not lose it.
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    requests.ConnectionError,
    requests.Timeout,
    SoftTimeLimitExceeded,
    ConnectionError,
    TimeoutError,
)


def classify(exc: BaseException) -> Retryable | Permanent:
    if isinstance(exc, Retryable | Permanent):
        return exc
    if isinstance(exc, _TRANSIENT):
        return Retryable(f"{type(exc).__name__}: {exc}")
    return Permanent(f"{type(exc).__name__}: {exc}")


def compute_backoff(
    attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Seconds before retry number ``attempt`` (0-based): exponential, capped, with jitter.

    "Equal jitter": half the exponential step is kept, half is random, so retries of many jobs
    that failed together spread out but none retries immediately.
    """
    step = min(cap_s, base_s * (2 ** min(attempt, 32)))
    jitter = (rng or random).uniform(0, step / 2)
    return float(step / 2 + jitter)
