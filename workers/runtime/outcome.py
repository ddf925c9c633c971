"""The one end-of-job path: how a job ends when it does not simply succeed where it ran.

- ``retry``: a retryable failure with retries left: a ``*_progress`` event saying so, then
  Celery's retry after capped exponential backoff with jitter (or the delay asked for).
- ``defer``: not now and not the job's fault (a provider's circuit is open): sent again after
  the delay, same id and attempt, without spending a retry.
- ``fail``: failed for good: a row in ``dead_letters`` (not for a cancellation, which was
  asked for), one ``*_error`` event, and a failed result where the caller's ``Job.result()``
  and ``conveyor submit --wait`` find it.
- ``settle``: a job finished by someone else (n8n's reconciler): its result and its
  ``*_complete`` event, as the job itself would have written them.

The job wrapper (``runtime.job``), the batcher (``runtime.batching``), the consumer that
refuses messages (``runtime.consumer``) and the n8n reconciler all end jobs through here, so
this is the one place to hook metrics and tracing on a job's end.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore, Reject

from conveyor import keys
from conveyor.envelopes import FAMILIES, result_envelope
from conveyor.errors import JobFailed
from conveyor.jobindex import Origin
from workers import settings
from workers.failures import Cancelled, Deferred, Permanent, Retryable, compute_backoff
from workers.runtime import celery_internals, connections
from workers.runtime.context import JobContext
from workers.store import dead_letters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ending:
    """How a job failed for good: ``reason`` (``exhausted``, ``permanent``, ``poison``,
    ``timeout``, ``refused``, ``unregistered``, ``cancelled``, …), what went wrong, and after
    how many attempts."""

    reason: str
    error: str
    attempts: int


def ending_of(verdict: Retryable | Permanent, attempts: int) -> Ending:
    """A retryable failure that ran out of retries is ``exhausted``; a permanent one keeps
    its own reason."""
    if isinstance(verdict, Permanent):
        return Ending(verdict.reason, str(verdict), attempts)
    return Ending("exhausted", f"gave up after {attempts} attempts: {verdict}", attempts)


def fail(
    job_id: str,
    task_name: str,
    payload: Any,
    ending: Ending,
    *,
    queue: str | None,
    family: str | None,
    store_result: bool,
    origin: Origin | None = None,
) -> None:
    """Record a job that failed for good and tell its listeners and waiters.

    The dead letter is written first and is the one step that raises (when neither Postgres
    nor Redis took it: the caller must not settle the message then). The event and the result
    are best effort: they are logged when Redis refuses them. ``store_result`` is False where
    Celery stores the failure itself (the job wrapper raising ``JobFailed``); ``family`` None
    (a message naming no known task) publishes no event.
    """
    origin = origin or Origin()
    cancelled = ending.reason == Cancelled.reason
    level = logging.INFO if cancelled else logging.WARNING
    log.log(
        level,
        "job %s (%s) ended (%s): %s%s",
        job_id,
        task_name,
        ending.reason,
        ending.error,
        f" [request {origin.request_id}]" if origin.request_id else "",
    )
    if not cancelled:  # asked for, not a failure: nothing to inspect or resubmit
        row = {
            "job_id": job_id,
            "task": task_name,
            "queue": queue,
            "payload": payload,
            "reason": ending.reason,
            "error": ending.error,
            "attempts": ending.attempts,
            "tenant": origin.tenant,
            "request_id": origin.request_id,
            "traceparent": origin.traceparent,
        }
        dead_letters.record(connections.engine(), connections.redis_client(), row)
    if store_result:  # before the event: a follower that sees it finds the result
        _store(job_id, JobFailed(ending.error), states.FAILURE)
    if family in FAMILIES:
        ctx = JobContext(job_id, task_name, ending.attempts - 1, family, origin=origin)
        ctx.emit_quietly(
            "error",
            {"error": ending.error, "reason": ending.reason, "attempts": ending.attempts},
            type="error",
        )


def cancel(task: Task, ctx: JobContext, ending: Ending) -> Exception:
    """A job stopped because someone asked (``conveyor cancel``): not a failure. Its result
    is REVOKED (``Job.result()`` says it was cancelled), Flower is told ``task-revoked`` rather
    than counting a failure, and its listeners get the ``*_error`` event (reason
    ``cancelled``). No dead letter: there is nothing to inspect or resubmit."""
    log.info("job %s (%s) cancelled: %s", ctx.job_id, ctx.task_name, ending.error)
    ctx.emit_quietly(  # first: the stream's own last progress must not come after it
        "error",
        {"error": ending.error, "reason": ending.reason, "attempts": ending.attempts},
        type="error",
    )
    try:
        task.backend.mark_as_revoked(ctx.job_id, ending.error, request=task.request)
        task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    except Exception:
        log.warning("could not record the cancellation of job %s", ctx.job_id, exc_info=True)
    ignore: Exception = Ignore()
    return ignore


def fail_results(job_ids: list[str], error: str) -> None:
    """Failed results for jobs that end with another's dead letter (the records of a packed
    message the consumer refused): their callers learn at once. Best effort."""
    for job_id in job_ids:
        _store(job_id, JobFailed(error), states.FAILURE)


def settle(job_id: str, task_name: str, family: str, data: dict[str, Any]) -> None:
    """A job finished elsewhere: its success envelope in the result backend, then its
    ``*_complete`` event (a follower that sees the event finds the result)."""
    envelope = result_envelope(job_id, success=True, data=data)
    _store(job_id, envelope, states.SUCCESS, raise_errors=True)
    JobContext(job_id, task_name, 0, family).emit("complete", data, type="complete")


def settle_quietly(results: list[tuple[str, dict[str, Any]]]) -> None:
    """Success envelopes of many jobs settled together (a batch of episodes), in one round
    trip, so ``Job.result()`` and ``conveyor submit --wait`` see each end within moments of
    its commit. No events (a batch writes thousands a second). Best effort: the work is done
    and stays done when Redis refuses its envelopes."""
    if not results:
        return
    from workers.app import app

    try:
        celery_internals.store_successes(
            app, [(job_id, result_envelope(job_id, success=True, data=d)) for job_id, d in results]
        )
    except Exception:
        log.warning("could not store the results of %d settled jobs", len(results), exc_info=True)


def retry(task: Task, ctx: JobContext, verdict: Retryable) -> Exception:
    """Celery's retry of this job after the backoff (or the delay the failure asked for)."""
    core = settings.core()
    delay = verdict.delay_s
    if delay is None:
        delay = compute_backoff(ctx.attempt, base_s=core.retry_base_s, cap_s=core.retry_cap_s)
    delay = min(delay, core.retry_cap_s)
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
    try:
        # The origin's headers go again: the retry is the same job, for the same request.
        retry: Exception = task.retry(
            countdown=delay, throw=False, headers=ctx.origin.headers() or None
        )
    except Exception as exc:  # the broker is away: the retry's message cannot go
        return _back_to_the_queue(ctx, "its retry could not be sent", exc)
    return retry


def defer(task: Task, ctx: JobContext, raw_payload: Any, verdict: Deferred) -> Exception:
    """Send the job again, same id and same attempt number, after the delay; ack this copy."""
    delay = min(verdict.delay_s or 0.0, settings.core().retry_cap_s)
    log.info("job %s (%s) deferred %.2fs: %s", ctx.job_id, ctx.task_name, delay, verdict)
    ctx.emit_quietly(
        "progress",
        {"deferred": True, "next_attempt_in_s": round(delay, 3), "reason": str(verdict)},
    )
    request = task.request
    delivery = request.delivery_info or {}
    try:
        # This delivery ends normally, so it must not count towards the redelivery cap.
        connections.redis_client().delete(keys.deliveries(ctx.job_id, ctx.attempt))
        task.apply_async(
            args=(raw_payload,),
            task_id=ctx.job_id,
            countdown=delay,
            retries=ctx.attempt,
            headers=ctx.origin.headers() or None,
            queue=delivery.get("routing_key"),
            priority=delivery.get("priority"),
        )
    except Exception as exc:
        return _back_to_the_queue(ctx, "its deferred copy could not be sent", exc)
    ignore: Exception = Ignore()
    return ignore


def _back_to_the_queue(ctx: JobContext, why: str, exc: Exception) -> Exception:
    """This delivery cannot be ended (the broker is away): give the message back, unsettled,
    rather than fail a job an outage interrupted. Redis hands it out again (at once, or after
    the visibility timeout if even the reject is lost); no result is stored for it."""
    log.warning("job %s (%s): %s (%r); back to the queue", ctx.job_id, ctx.task_name, why, exc)
    with contextlib.suppress(Exception):  # an outage is not the job dying: do not count it
        connections.redis_client().delete(keys.deliveries(ctx.job_id, ctx.attempt))
    reject: Exception = Reject(f"{why}: {exc}", requeue=True)
    return reject


def _store(job_id: str, result: Any, state: str, *, raise_errors: bool = False) -> None:
    from workers.app import app  # the result backend; imported late: app imports the runtime

    try:
        app.backend.store_result(job_id, result, state)
    except Exception:
        if raise_errors:
            raise
        log.exception("could not store the %s result of job %s", state, job_id)
