"""The reconciler: finishes n8n executions a job handed over at its deadline.

A beat job (``maintenance.reconcile_workflows``) runs one pass every 30 s: it reads each
execution still running past its job's deadline from n8n and reports its end through
``Reconciled``, as the job itself would have (a conditional update of the row decides who
reports, so a late job and the reconciler never both do).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from datetime import timedelta
from typing import Any, Protocol

from workers.failures import Retryable
from workers.n8n.client import TriggerOutcomeUnknown, WorkflowFailed
from workers.n8n.workflows import Runtime, failure_message, observe, read_execution, result_data
from workers.resilience.breakers import CircuitOpen
from workers.store import executions
from workers.store.executions import OUTCOME_UNKNOWN, ExecutionRow

log = logging.getLogger(__name__)


class Reconciled(Protocol):
    """How the reconciler reports the end of an execution a job handed over."""

    def progress(self, row: ExecutionRow, data: dict[str, Any]) -> None: ...

    def succeeded(self, row: ExecutionRow, data: dict[str, Any]) -> None: ...

    def failed(self, row: ExecutionRow, message: str, reason: str) -> None: ...


def reconcile(
    rt: Runtime, report: Reconciled, *, grace_s: float, limit: int, budget_s: float
) -> dict[str, int]:
    """One pass over executions still running past their job's deadline (and ``grace_s``, so
    a job's last read is not raced): read each from n8n, record and report what changed.

    Counts what it did: ``success``, ``failed``, ``unknown`` (unreadable, reported unknown),
    ``running`` (still going), ``unreachable`` (n8n did not answer; next pass), ``raced``.
    """
    counts: Counter[str] = Counter()
    if rt.client is None:
        return {}
    client = rt.client
    rows = executions.due_for_reconcile(
        rt.engine, before=rt.now() - timedelta(seconds=grace_s), limit=limit
    )
    started = time.monotonic()
    for index, row in enumerate(rows):
        if time.monotonic() - started > budget_s:
            counts["left"] += len(rows) - index
            break
        try:
            execution = read_execution(rt, client, row)
        except CircuitOpen:
            counts["left"] += len(rows) - index  # n8n is down: the next pass tries again
            break
        except Retryable as exc:
            log.warning("reconcile: n8n execution %s unreadable: %s", row.n8n_execution_id, exc)
            counts["unreachable"] += 1
            continue
        except TriggerOutcomeUnknown as exc:
            after = executions.get(rt.engine, row.job_id)
            if after is not None and after.status == OUTCOME_UNKNOWN:
                report.failed(after, str(exc), TriggerOutcomeUnknown.reason)
            counts["unknown"] += 1
            continue
        observed = observe(rt, row, execution, functools.partial(report.progress, row))
        if observed is None:
            counts["raced"] += 1
        elif observed.status == "success":
            report.succeeded(observed, result_data(observed))
            counts["success"] += 1
        elif observed.finished:
            report.failed(observed, failure_message(observed), WorkflowFailed.reason)
            counts["failed"] += 1
        else:
            counts["running"] += 1
    return dict(counts)
