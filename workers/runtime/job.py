"""The one wrapper every public task runs through.

``@job("ai.chat", family="ai")`` turns a plain function ``fn(ctx, payload) -> dict`` into a
Celery task that: caps redelivery of a message that keeps killing its worker; validates the
payload against the task's schema; publishes start / progress / complete / error events;
retries what ``workers.failures.classify`` calls retryable, with capped exponential backoff
and jitter (or the delay the failure asked for); and puts what failed for good into
``dead_letters``. The function itself knows nothing of Celery.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Ignore, TimeLimitExceeded

from conveyor import keys
from conveyor.envelopes import FAMILIES, EventType, result_envelope
from conveyor.errors import JobFailed, PayloadError
from conveyor.schemas import validate_payload
from conveyor.schemas.common import Payload
from workers.app import app
from workers.failures import (
    Cancelled,
    Deferred,
    HandedOver,
    Permanent,
    Poison,
    Retryable,
    classify,
    compute_backoff,
)
from workers.runtime import connections
from workers.runtime.events import EventPublisher
from workers.store import dead_letters

log = logging.getLogger(__name__)

#: Seconds a delivery counter lives: far longer than any job can be redelivered over.
_DELIVERY_COUNTER_TTL = 7 * 86_400


@dataclass(frozen=True)
class JobContext:
    """What a job function may know and do besides its payload."""

    job_id: str
    task_name: str
    #: 0 on the first attempt, n on the n-th retry.
    attempt: int
    component: str
    event_prefix: str
    publisher: EventPublisher
    #: The Celery worker's node name, e.g. ``ai@host``.
    hostname: str = ""

    def emit(self, suffix: str, data: dict[str, Any], *, type: EventType = "update") -> None:
        """Publish ``<prefix>_<suffix>`` (e.g. ``ai_generation_progress``) for this job."""
        self.publisher.publish(
            self.job_id,
            type=type,
            component=self.component,
            event=f"{self.event_prefix}_{suffix}",
            data=data,
        )

    def emit_soon(self, suffix: str, data: dict[str, Any]) -> None:
        """Like ``emit``, in the process's next event batch (``EventPublisher.publish_soon``):
        no round trip of its own, and still before any later event of this job. Best effort:
        a batch Redis refuses is logged, not raised (the job's own Redis calls fail anyway)."""
        self.publisher.publish_soon(
            self.job_id,
            type="update",
            component=self.component,
            event=f"{self.event_prefix}_{suffix}",
            data=data,
        )

    def progress(self, **data: Any) -> None:
        self.emit("progress", data)

    def emit_quietly(
        self, suffix: str, data: dict[str, Any], *, type: EventType = "update"
    ) -> None:
        """Publish, logging instead of raising: for events about a failure (Redis may be its
        cause) and for progress inside a stream (a Redis hiccup must not fail a generation)."""
        try:
            self.emit(suffix, data, type=type)
        except Exception:
            log.exception(
                "could not publish %s_%s for job %s", self.event_prefix, suffix, self.job_id
            )


JobFunction = Callable[[JobContext, Any], dict[str, Any]]


@functools.cache
def publisher() -> EventPublisher:
    conf = app.conf
    return EventPublisher(
        connections.redis_client(),
        stream_maxlen=conf.conveyor_event_stream_maxlen,
        ttl_s=conf.conveyor_event_ttl,
    )


class JobTask(Task):
    """Celery's Task, plus a dead letter for a job killed at its hard time limit.

    That kill happens in the pool's parent process, where ``_run`` never sees it.
    """

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, TimeLimitExceeded):
            record_dead_letter(
                self,
                task_id,
                args[0] if args else None,
                "timeout",
                f"killed at the hard time limit ({exc})",
                self.request.retries + 1,
            )


def job(name: str, *, family: str, **task_options: Any) -> Callable[[JobFunction], Task]:
    """Register ``fn(ctx, payload)`` as the public task ``name`` of a family in ``FAMILIES``."""
    component, prefix = FAMILIES[family]

    def register(fn: JobFunction) -> Task:
        @functools.wraps(fn)
        def run(task: Task, payload: Any) -> dict[str, Any]:
            ctx = JobContext(
                job_id=task.request.id,
                task_name=name,
                attempt=task.request.retries,
                component=component,
                event_prefix=prefix,
                publisher=publisher(),
                hostname=task.request.hostname or "",
            )
            return _run(task, ctx, fn, payload)

        # max_retries=None: Celery must not cap retries on its own; _run counts them.
        return app.task(name=name, bind=True, base=JobTask, max_retries=None, **task_options)(run)

    return register


def _run(task: Task, ctx: JobContext, fn: JobFunction, raw_payload: Any) -> dict[str, Any]:
    conf = task.app.conf
    try:
        _check_delivery(ctx, conf.conveyor_max_deliveries)
        payload = _validate(ctx.task_name, raw_payload, conf.conveyor_max_payload_bytes)
        ctx.emit_soon("start", {"task": ctx.task_name, "attempt": ctx.attempt + 1})
        data = fn(ctx, payload)
    except HandedOver as exc:
        # Another job reports the end (result and terminal event); this message is done.
        log.info("job %s (%s) handed over: %s", ctx.job_id, ctx.task_name, exc)
        ctx.emit_quietly("progress", {"handed_over": True, "reason": str(exc), **exc.data})
        raise Ignore() from None
    except Exception as exc:
        verdict = classify(exc)
        if isinstance(verdict, Deferred):
            raise _defer(task, ctx, raw_payload, verdict) from None
        if isinstance(verdict, Retryable) and ctx.attempt < conf.conveyor_max_retries:
            raise _retry(task, ctx, verdict) from None
        _fail(task, ctx, raw_payload, verdict)
    ctx.emit("complete", data, type="complete")
    return result_envelope(ctx.job_id, success=True, data=data)


def _check_delivery(ctx: JobContext, limit: int) -> None:
    """Count this delivery (a message whose worker died under it ``limit`` times is poison) and
    see whether the job was cancelled before it started, in one round trip."""
    counter = keys.deliveries(ctx.job_id, ctx.attempt)
    pipe = connections.redis_client().pipeline(transaction=False)
    pipe.incr(counter)
    pipe.expire(counter, _DELIVERY_COUNTER_TTL)
    pipe.exists(keys.cancel(ctx.job_id))
    delivered, _, cancelled = pipe.execute()
    if delivered > limit:
        raise Poison(
            f"delivered {delivered} times without finishing (limit {limit}): "
            "its worker died each time"
        )
    if cancelled:
        raise Cancelled("cancelled before it started")


def _validate(task_name: str, raw_payload: Any, max_bytes: int) -> Payload:
    try:
        return validate_payload(task_name, raw_payload, max_bytes=max_bytes)
    except PayloadError as exc:
        raise Poison(str(exc)) from None


def _retry(task: Task, ctx: JobContext, verdict: Retryable) -> Exception:
    conf = task.app.conf
    delay = verdict.delay_s
    if delay is None:
        delay = compute_backoff(
            ctx.attempt, base_s=conf.conveyor_retry_base_s, cap_s=conf.conveyor_retry_cap_s
        )
    delay = min(delay, conf.conveyor_retry_cap_s)
    log.warning(
        "job %s (%s) attempt %d failed, retrying in %.2fs: %s",
        ctx.job_id,
        ctx.task_name,
        ctx.attempt + 1,
        delay,
        verdict,
    )
    ctx.emit_quietly(
        "progress",
        {
            "retrying": True,
            "attempt": ctx.attempt + 1,
            "next_attempt_in_s": round(delay, 3),
            "error": str(verdict),
        },
    )
    # throw=False: Celery's Retry comes back to be raised by the caller, outside its try.
    return task.retry(countdown=delay, throw=False)


def _defer(task: Task, ctx: JobContext, raw_payload: Any, verdict: Deferred) -> Exception:
    """Send the job again, same id and same attempt number, after the delay; ack this copy."""
    delay = min(verdict.delay_s or 0.0, task.app.conf.conveyor_retry_cap_s)
    log.info("job %s (%s) deferred %.2fs: %s", ctx.job_id, ctx.task_name, delay, verdict)
    ctx.emit_quietly(
        "progress",
        {"deferred": True, "next_attempt_in_s": round(delay, 3), "reason": str(verdict)},
    )
    # This delivery ends normally, so it must not count towards the redelivery cap.
    connections.redis_client().delete(keys.deliveries(ctx.job_id, ctx.attempt))
    request = task.request
    task.apply_async(
        args=(raw_payload,),
        task_id=ctx.job_id,
        countdown=delay,
        retries=ctx.attempt,
        queue=(request.delivery_info or {}).get("routing_key"),
        priority=(request.delivery_info or {}).get("priority"),
    )
    return Ignore()


def _fail(task: Task, ctx: JobContext, raw_payload: Any, verdict: Retryable | Permanent) -> None:
    """Record a job that failed for good, tell its listeners, and fail the Celery task."""
    reason = verdict.reason if isinstance(verdict, Permanent) else "exhausted"
    attempts = ctx.attempt + 1
    message = (
        str(verdict) if reason != "exhausted" else f"gave up after {attempts} attempts: {verdict}"
    )
    log.error("job %s (%s) failed for good (%s): %s", ctx.job_id, ctx.task_name, reason, message)
    if reason != Cancelled.reason:  # asked for, not a failure: nothing to inspect or resubmit
        record_dead_letter(task, ctx.job_id, raw_payload, reason, message, attempts)
    ctx.emit_quietly(
        "error", {"error": message, "reason": reason, "attempts": attempts}, type="error"
    )
    raise JobFailed(message)


def record_dead_letter(
    task: Task, job_id: str, payload: Any, reason: str, error: str, attempts: int
) -> None:
    delivery = task.request.delivery_info or {}
    row = {
        "job_id": job_id,
        "task": task.name,
        "queue": delivery.get("routing_key"),
        "payload": payload,
        "reason": reason,
        "error": error,
        "attempts": attempts,
    }
    dead_letters.record(connections.engine(), connections.redis_client(), row)
