"""The one wrapper every public task runs through.

``@job("ai.chat", family="ai")`` turns a plain function ``fn(ctx, payload) -> dict`` into a
Celery task that: caps redelivery of a message that keeps killing its worker; validates the
payload against the task's schema; publishes start / complete events; and ends every failure
through ``runtime.outcome`` (retry, defer, or fail for good). The function itself knows
nothing of Celery (``runtime.context.JobContext``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Ignore, TimeLimitExceeded

from conveyor import keys
from conveyor.envelopes import FAMILIES, result_envelope
from conveyor.errors import JobFailed, PayloadError
from conveyor.jobindex import Origin
from conveyor.schemas import validate_payload
from conveyor.schemas.common import Payload
from workers import settings
from workers.app import app
from workers.failures import Cancelled, Deferred, HandedOver, Poison, Retryable, classify
from workers.runtime import connections, outcome
from workers.runtime.context import JobContext, publisher

__all__ = ["JobContext", "JobTask", "job", "publisher"]

log = logging.getLogger(__name__)

#: Seconds a delivery counter lives: far longer than any job can be redelivered over.
_DELIVERY_COUNTER_TTL = 7 * 86_400

JobFunction = Callable[[JobContext, Any], dict[str, Any]]


class JobTask(Task):
    """Celery's Task, plus the end of a job killed at its hard time limit.

    That kill happens in the pool's parent process, where ``_run`` never sees it; Celery
    stores the failed result itself.
    """

    #: The family of the job (``conveyor.envelopes.FAMILIES``).
    family = ""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, JobFailed):  # ended through runtime.outcome already
            return
        if isinstance(exc, TimeLimitExceeded):
            ending = outcome.Ending(
                "timeout", f"killed at the hard time limit ({exc})", self.request.retries + 1
            )
        elif (
            isinstance(exc, TypeError)
            and not self.request.called_directly
            and _unappliable(args, kwargs)
        ):  # Celery could not even call the job with what the message carried
            ending = outcome.Ending(
                "poison", f"malformed task message: {type(exc).__name__}: {exc}", 1
            )
        else:  # escaped the job's own handling (an outage while ending it, a limit): say so
            ending = outcome.Ending(
                "internal",
                f"{type(exc).__name__} while ending the job: {exc}",
                self.request.retries + 1,
            )
        try:
            raw_payload = _Arguments(tuple(args or ()), dict(kwargs or {})).raw_payload
        except (TypeError, ValueError):  # args or kwargs of the wrong type altogether
            raw_payload = {"args": repr(args)[:10_000], "kwargs": repr(kwargs)[:10_000]}
        outcome.fail(
            task_id,
            self.name,
            raw_payload,
            ending,
            queue=(self.request.delivery_info or {}).get("routing_key"),
            family=self.family,
            store_result=False,
            origin=origin_of(self.request),
        )


def origin_of(request: Any) -> Origin:
    """The origin a job's message carried (Celery copies custom headers onto its request)."""
    return Origin.from_headers(lambda name: getattr(request, name, None))


def _unappliable(args: Any, kwargs: Any) -> bool:
    """Args or kwargs no call could take (the consumer refuses most such messages first)."""
    return not isinstance(args, list | tuple) or not isinstance(kwargs, dict | type(None))


def job(name: str, *, family: str, **task_options: Any) -> Callable[[JobFunction], Task]:
    """Register ``fn(ctx, payload)`` as the public task ``name`` of a family in ``FAMILIES``."""
    FAMILIES[family]  # an unknown family fails here, at import, not at the first failure

    def register(fn: JobFunction) -> Task:
        @functools.wraps(fn)
        def run(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
            ctx = JobContext(
                job_id=task.request.id,
                task_name=name,
                attempt=task.request.retries,
                family=family,
                hostname=task.request.hostname or "",
                origin=origin_of(task.request),
            )
            # Anything a raw message carries arrives here: the shape is checked in _run, so a
            # wrong one is poison with a dead letter, not a TypeError in Celery's tracer.
            return _run(task, ctx, fn, _Arguments(args, kwargs))

        # max_retries=None: Celery must not cap retries on its own; _run counts them.
        # throws: a job that failed for good is expected, not a crash: Celery records the
        # failure without an ERROR line and a traceback (outcome.fail logged it once).
        return app.task(
            name=name,
            bind=True,
            base=JobTask,
            max_retries=None,
            family=family,
            throws=(JobFailed,),
            **task_options,
        )(run)

    return register


class _Arguments:
    """What a message's args and kwargs held: a job takes exactly one payload."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.args = args
        self.kwargs = kwargs

    @property
    def raw_payload(self) -> Any:
        """The payload as received (for its dead letter), or everything when it is not one."""
        if len(self.args) == 1 and not self.kwargs:
            return self.args[0]
        return {"args": list(self.args), "kwargs": self.kwargs}

    def check(self) -> None:
        if len(self.args) != 1 or self.kwargs:
            raise Poison(
                "a job takes its payload (a JSON object) as its only argument; this message "
                f"has {len(self.args)} argument(s) and keyword arguments {sorted(self.kwargs)}"
            )


def _run(task: Task, ctx: JobContext, fn: JobFunction, arguments: _Arguments) -> dict[str, Any]:
    core = settings.core()
    raw_payload = arguments.raw_payload
    try:
        _check_delivery(ctx, core.max_deliveries)
        arguments.check()
        payload = _validate(ctx.task_name, raw_payload, core.max_payload_bytes)
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
            raise outcome.defer(task, ctx, raw_payload, verdict) from None
        if isinstance(verdict, Retryable) and ctx.attempt < core.max_retries:
            raise outcome.retry(task, ctx, verdict) from None
        ending = outcome.ending_of(verdict, ctx.attempt + 1)
        if isinstance(verdict, Cancelled):
            raise outcome.cancel(task, ctx, ending) from None
        outcome.fail(
            ctx.job_id,
            ctx.task_name,
            raw_payload,
            ending,
            queue=(task.request.delivery_info or {}).get("routing_key"),
            family=ctx.family,
            store_result=False,  # Celery stores the failure of the JobFailed raised here
            origin=ctx.origin,
        )
        raise JobFailed(ending.error) from None
    return complete(ctx, data)


def complete(ctx: JobContext, data: dict[str, Any]) -> dict[str, Any]:
    """The job's work is done: its ``*_complete`` event, then its success envelope. The work
    is never turned into a failure afterwards: an event Redis refuses is logged, and the
    envelope (which Celery stores as the result) still says what the job did."""
    try:
        ctx.emit("complete", data, type="complete")
    except Exception as exc:
        log.warning(
            "job %s (%s) done, its complete event not published: %r", ctx.job_id, ctx.task_name, exc
        )
    return result_envelope(ctx.job_id, success=True, data=data, request_id=ctx.origin.request_id)


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
