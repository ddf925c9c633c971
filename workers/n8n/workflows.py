"""Running an n8n workflow for a job: trigger it once, follow it to its end, or hand it over.

Plain code with no Celery in it: ``tasks/n8n.py`` passes in the job id, the payload and
callbacks for events and episodes; the ``workflow_executions`` row (``workers.store.executions``)
carries the state from one delivery of the job to the next.

- **Never twice.** The row is claimed, keyed by job id, *before* the webhook is called. A
  delivery that finds it claimed resumes from it: it follows the execution n8n already started,
  returns (or fails with) the outcome already recorded, or — when an earlier delivery died
  between claiming and recording n8n's answer — reports that the outcome is unknown
  (``TriggerOutcomeUnknown``), because n8n may be running that workflow and would run a second
  POST a second time. Only a trigger n8n provably did not start gives the claim back: never
  sent (connection refused, circuit open), or refused in n8n's own words before any run (not
  registered, the Webhook node's authentication, n8n starting up, its database not ready). Any
  other answer to a call that was sent — a 5xx after the run such as "No item to return was
  found", a Respond to Webhook node's error status, a proxy's 502/503/504, a 429 — keeps the
  claim and ends the job as an unknown outcome (``client.py`` lists n8n's answers).
- **Following** (async mode) reads ``GET /api/v1/executions/{id}``, with a wait between reads
  that grows with the execution's age (``poll_delay``). One delivery polls in place for at most
  ``hold_s``, then sends the job back to the queue for its next read (``Deferred``: no retry
  spent), so a long run never holds one message, or one worker thread, for minutes.
- **Deadline.** At the job's deadline (its ``timeout_s`` after the first claim) an execution
  still running is handed over (``HandedOver``) to ``reconcile.py``, which a beat job runs: it reads
  those executions and reports their end to the job's listeners and waiters.
- Every status change is one progress event; whoever moves the row to its end (a conditional
  update) is the one that reports it, so a job and the reconciler never both do.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any, TypeVar

import sqlalchemy.exc
from sqlalchemy import Engine

from conveyor.schemas.n8n import N8nExecutePayload
from workers.failures import Deferred, HandedOver, Permanent, Retryable
from workers.n8n.client import (
    IDEMPOTENCY_HEADER,
    Execution,
    N8nClient,
    TriggerOutcomeUnknown,
    WorkflowFailed,
    next_poll_delay,
)
from workers.resilience.breakers import SharedBreaker
from workers.store import executions
from workers.store.executions import (
    FOLLOWING,
    NOT_TRIGGERED,
    OUTCOME_UNKNOWN,
    TRIGGERING,
    ExecutionRow,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The beat job that finishes what a job handed over.
RECONCILER = "maintenance.reconcile_workflows"
#: Shortest wait between two reads of one execution, whatever the jitter (seconds).
_MIN_POLL_S = 0.05

Progress = Callable[[dict[str, Any]], None]
Episode = Callable[[ExecutionRow], None]


@dataclass(frozen=True)
class FollowSettings:
    """How executions are polled (seconds); ``celeryconfig``'s ``conveyor_n8n_poll_*``."""

    poll_base_s: float
    poll_cap_s: float
    #: How long one delivery may keep polling in place before it re-enqueues the job.
    hold_s: float


@dataclass(frozen=True)
class Runtime:
    """What running a workflow needs from the worker: n8n, the database, the shared breaker."""

    client: N8nClient | None
    engine: Engine
    breaker: SharedBreaker
    settings: FollowSettings
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    rng: Random | None = None


def execute(
    rt: Runtime,
    job_id: str,
    payload: N8nExecutePayload,
    *,
    progress: Progress,
    episode: Episode,
) -> dict[str, Any]:
    """Run ``payload``'s workflow for job ``job_id`` (or resume it); the job's result data.

    Raises ``WorkflowFailed`` (it ran and failed), ``TriggerOutcomeUnknown``, ``Permanent``,
    ``Retryable`` (n8n provably did not start the run: unreachable, starting up, its database
    not ready), ``Deferred`` (poll again later) or ``HandedOver`` (still running at the
    deadline: the reconciler reports its end).
    """
    client = configured(rt.client)
    path = client.resolve_path(payload.workflow)
    if payload.mode == "async" and not client.can_follow:
        raise Permanent(
            "async mode follows the execution through n8n's public API, and N8N_API_KEY is "
            "not set on this worker"
        )
    now = rt.now()
    row, owner = executions.claim(
        rt.engine,
        job_id,
        workflow=payload.workflow,
        mode=payload.mode,
        input=payload.model_dump(mode="json"),
        now=now,
        deadline_at=now + timedelta(seconds=payload.timeout_s),
    )
    if owner:
        progress({"status": TRIGGERING, "workflow": payload.workflow, "mode": payload.mode})
        row = _trigger(rt, client, row, path, payload, progress, episode)
    return _resume(rt, client, row, progress, episode)


def configured(client: N8nClient | None) -> N8nClient:
    if client is None:
        raise Permanent(
            "n8n is not configured on this worker: set N8N_BASE_URL (and N8N_API_KEY to follow "
            "async runs) in the n8n pool's environment"
        )
    return client


def result_data(row: ExecutionRow) -> dict[str, Any]:
    """A successful job's ``data``: sync, the webhook's answer; async, the JSON of every item
    the last node produced (a list)."""
    return {
        "workflow": row.workflow,
        "mode": row.mode,
        "execution_id": row.n8n_execution_id,
        "status": row.status,
        "output": row.output,
    }


def failure_message(row: ExecutionRow) -> str:
    """What a failed job says: n8n's own message and the failing node, when n8n reports them."""
    if row.status == OUTCOME_UNKNOWN:
        return row.error or f"the outcome of workflow {row.workflow!r} is unknown"
    where = f" at node {row.error_node!r}" if row.error_node else ""
    execution = f" (n8n execution {row.n8n_execution_id})" if row.n8n_execution_id else ""
    said = row.error or f"the execution ended {row.status}"
    return f"workflow {row.workflow!r} failed{where}{execution}: {said}"


def episode_fields(row: ExecutionRow) -> dict[str, Any]:
    """The episode of one finished execution (``EpisodePayload``'s fields, minus the ids)."""
    payload = row.input
    latency_ms = None
    if row.triggered_at and row.finished_at:
        latency_ms = max(0.0, (row.finished_at - row.triggered_at).total_seconds() * 1000)
    metadata = {
        **(payload.get("metadata") or {}),
        "workflow": row.workflow,
        "mode": row.mode,
        "execution_id": row.n8n_execution_id,
    }
    if row.status != "success":
        metadata |= {"error": row.error, "error_node": row.error_node}
    return {
        "timestamp": row.triggered_at,
        "user_id": payload.get("user_id") or "anonymous",
        "session_id": payload.get("session_id"),
        "model_type": f"n8n:{row.workflow}"[:200],
        "prompt": _json(payload.get("data", {})),
        "response": _json(row.output) if row.status == "success" else "",
        "latency_ms": None if latency_ms is None else round(latency_ms, 1),
        "status": row.status,
        "metadata": metadata,
    }


def poll_delay(age_s: float, *, base_s: float, cap_s: float, rng: Random | None = None) -> float:
    """Seconds before the next read of an execution ``age_s`` old: about its age, between
    ``base_s`` and ``cap_s``, jittered. Derived from the age rather than a count of reads, so
    it needs no state across deliveries: reads land at roughly doubling ages."""
    attempt = int(math.log2(1 + max(age_s, 0.0) / base_s)) if base_s > 0 else 0
    return max(_MIN_POLL_S, next_poll_delay(attempt, base_s=base_s, cap_s=cap_s, rng=rng))


# -- one job ------------------------------------------------------------------------------------


def _trigger(
    rt: Runtime,
    client: N8nClient,
    row: ExecutionRow,
    path: str,
    payload: N8nExecutePayload,
    progress: Progress,
    episode: Episode,
) -> ExecutionRow:
    """Call the webhook once, for the row this caller claimed; the row as n8n's answer left it."""
    job_id = row.job_id
    left = _seconds_left(rt, row)
    if left <= 0:  # retried until past its deadline: the caller has stopped waiting
        exc = Permanent(
            f"the job's deadline ({payload.timeout_s:g} s) passed before n8n accepted the run; "
            f"workflow {payload.workflow!r} was not triggered"
        )
        _release(rt, job_id, exc)
        raise exc
    read_timeout_s = None
    if payload.mode == "sync":  # the whole run happens inside this call: bound it by the deadline
        read_timeout_s = max(1.0, min(client.read_timeout_s, left))
    sent = False
    try:
        with rt.breaker.guard():
            sent = True
            answer = client.trigger(
                path, payload.data, idempotency_key=job_id, read_timeout_s=read_timeout_s
            )
    except TriggerOutcomeUnknown as exc:
        unknown = str(exc)
        _after_trigger(
            rt,
            lambda: executions.transition(
                rt.engine,
                job_id,
                expected={TRIGGERING},
                status=OUTCOME_UNKNOWN,
                error=unknown,
                finished_at=rt.now(),
            ),
        )
        raise
    except WorkflowFailed as exc:  # sync: it ran and failed before answering
        said = str(exc)
        failed = _after_trigger(
            rt,
            lambda: executions.transition(
                rt.engine,
                job_id,
                expected={TRIGGERING},
                status="error",
                error=said,
                finished_at=rt.now(),
            ),
        )
        if failed is not None:
            progress({"status": "error", "error": said, "node": None})
            episode(failed)
        raise
    except (Retryable, Permanent) as exc:
        # The client raises these only when n8n provably did not start the run: never sent,
        # the circuit open, or n8n's own "not registered", Webhook authentication, "starting
        # up" or "Database is not ready!" answers. Every other answer is one of the two above.
        _release(rt, job_id, exc)
        raise
    except Exception as exc:
        if not sent:  # failed before the request (e.g. Redis, for the breaker): nothing sent
            _release(rt, job_id, exc)
        # Otherwise the row stays "triggering": whoever reads it next reports an unknown outcome.
        raise

    if payload.mode == "sync":
        done = _after_trigger(
            rt,
            lambda: executions.transition(
                rt.engine,
                job_id,
                # We know better than an "unknown" another delivery may have written meanwhile.
                expected={TRIGGERING, OUTCOME_UNKNOWN},
                status="success",
                n8n_execution_id=answer.execution_id,
                output=answer.body,
                error=None,
                finished_at=rt.now(),
            ),
        )
        if done is not None:
            progress({"status": "success", "execution_id": answer.execution_id})
        return done or _reread(rt, job_id)

    if answer.execution_id is None:
        message = (
            f"workflow {row.workflow!r} started but its webhook answered without an execution id "
            f"({_json(answer.body)[:200]}), so it cannot be followed: answer early with a Respond "
            'to Webhook node sending {"executionId": "{{ $execution.id }}"}, or use mode "sync"'
        )
        executions.transition(
            rt.engine,
            job_id,
            expected={TRIGGERING},
            status=OUTCOME_UNKNOWN,
            error=message,
            finished_at=rt.now(),
        )
        raise Permanent(message)
    started = _after_trigger(
        rt,
        lambda: executions.transition(
            rt.engine,
            job_id,
            expected={TRIGGERING, OUTCOME_UNKNOWN},
            status="new",
            n8n_execution_id=answer.execution_id,
            error=None,
            finished_at=None,
        ),
    )
    if started is not None:
        progress({"status": "new", "execution_id": answer.execution_id})
    return started or _reread(rt, job_id)


def _resume(
    rt: Runtime, client: N8nClient, row: ExecutionRow, progress: Progress, episode: Episode
) -> dict[str, Any]:
    """Carry on from what the row says: follow, or report the end already recorded."""
    if row.status == TRIGGERING:
        # An earlier delivery claimed the trigger and never recorded n8n's answer: it died
        # during the call (or is still in it). n8n may be running the workflow; a second POST
        # would run it again.
        message = (
            f"job {row.job_id} was interrupted while triggering workflow {row.workflow!r}: n8n "
            "may or may not have started it, so it is not triggered again. Look for "
            f"{IDEMPOTENCY_HEADER}: {row.job_id} in n8n's executions (the Webhook node's "
            "headers) and submit a new job if it never ran"
        )
        executions.transition(
            rt.engine,
            row.job_id,
            expected={TRIGGERING},
            status=OUTCOME_UNKNOWN,
            error=message,
            finished_at=rt.now(),
        )
        raise TriggerOutcomeUnknown(message)
    if row.status == NOT_TRIGGERED:  # claim() takes these back; only a race lands here
        raise Retryable(f"workflow {row.workflow!r} was given back untriggered meanwhile")
    if row.status in FOLLOWING:
        return _follow(rt, client, row, progress, episode)
    return _report_end(row, episode)


def _report_end(row: ExecutionRow, episode: Episode) -> dict[str, Any]:
    if row.status == OUTCOME_UNKNOWN:
        raise TriggerOutcomeUnknown(failure_message(row))
    episode(row)  # idempotent: the episode id derives from the job id
    if row.status == "success":
        return result_data(row)
    raise WorkflowFailed(failure_message(row))


def _follow(
    rt: Runtime, client: N8nClient, row: ExecutionRow, progress: Progress, episode: Episode
) -> dict[str, Any]:
    settings = rt.settings
    held_since = time.monotonic()
    while True:
        execution = read_execution(rt, client, row)
        observed = observe(rt, row, execution, progress)
        if observed is None:
            raise HandedOver(
                f"n8n execution {row.n8n_execution_id} was finished by another delivery or by "
                f"{RECONCILER}",
                data={"execution_id": row.n8n_execution_id},
            )
        row = observed
        if row.finished:
            return _report_end(row, episode)
        left = _seconds_left(rt, row)
        if left <= 0:
            raise HandedOver(
                f"workflow {row.workflow!r} is still {row.status} at the job's deadline; "
                f"{RECONCILER} will report its end",
                data={
                    "status": row.status,
                    "execution_id": row.n8n_execution_id,
                    "reconciler": RECONCILER,
                },
            )
        age = (rt.now() - (row.triggered_at or rt.now())).total_seconds()
        delay = min(
            left,
            poll_delay(age, base_s=settings.poll_base_s, cap_s=settings.poll_cap_s, rng=rt.rng),
        )
        if time.monotonic() - held_since + delay > settings.hold_s:
            raise Deferred(
                f"n8n execution {row.n8n_execution_id} is {row.status}; next read in {delay:.1f} s",
                delay_s=delay,
            )
        rt.sleep(delay)


def read_execution(rt: Runtime, client: N8nClient, row: ExecutionRow) -> Execution:
    execution_id = row.n8n_execution_id
    assert execution_id is not None, "a followed row has an execution id"
    try:
        with rt.breaker.guard():
            return client.get_execution(execution_id)
    except Permanent as exc:
        # The API will not tell us (404: pruned or invisible to the key; 401/403): the run may
        # go on in n8n, but nobody here will learn how it ends.
        message = f"cannot follow n8n execution {execution_id} of workflow {row.workflow!r}: {exc}"
        executions.transition(
            rt.engine,
            row.job_id,
            expected=FOLLOWING,
            status=OUTCOME_UNKNOWN,
            error=message,
            finished_at=rt.now(),
        )
        raise TriggerOutcomeUnknown(message) from exc


def observe(
    rt: Runtime, row: ExecutionRow, execution: Execution, progress: Progress
) -> ExecutionRow | None:
    """Record what n8n reported (one progress event per status change); None when someone else
    moved the row first (they report it)."""
    if execution.status == row.status:
        return row
    values: dict[str, Any] = {"status": execution.status}
    if execution.terminal:
        values["finished_at"] = execution.stopped_at or rt.now()
        if execution.status == "success":
            values["output"] = execution.output
        else:
            values["error"] = execution.error_message
            values["error_node"] = execution.error_node
    changed = executions.transition(rt.engine, row.job_id, expected=FOLLOWING, **values)
    if changed is None:
        return None
    event: dict[str, Any] = {
        "status": changed.status,
        "previous": row.status,
        "execution_id": changed.n8n_execution_id,
    }
    if execution.terminal and changed.status != "success":
        event |= {"error": changed.error, "node": changed.error_node}
    progress(event)
    return changed


# -- helpers ------------------------------------------------------------------------------------


def _seconds_left(rt: Runtime, row: ExecutionRow) -> float:
    if row.deadline_at is None:
        return math.inf
    return (row.deadline_at - rt.now()).total_seconds()


def _release(rt: Runtime, job_id: str, exc: BaseException) -> None:
    executions.transition(
        rt.engine,
        job_id,
        expected={TRIGGERING},
        status=NOT_TRIGGERED,
        error=str(exc)[:2000],
        triggered_at=None,
    )


def _after_trigger(rt: Runtime, write: Callable[[], T], *, attempts: int = 4) -> T:
    """Record n8n's answer. Losing this write would turn a known outcome into an unknown one
    (the row stays "triggering"), so a database hiccup is retried in place for a few seconds."""
    for attempt in range(attempts):
        try:
            return write()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError):
            if attempt == attempts - 1:
                raise
            log.warning("recording n8n's answer failed; retrying", exc_info=True)
            rt.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _reread(rt: Runtime, job_id: str) -> ExecutionRow:
    row = executions.get(rt.engine, job_id)
    assert row is not None, f"workflow_executions row of job {job_id} vanished"
    return row


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


__all__ = [
    "RECONCILER",
    "FollowSettings",
    "Runtime",
    "configured",
    "episode_fields",
    "execute",
    "failure_message",
    "observe",
    "poll_delay",
    "read_execution",
    "result_data",
]
