"""The ``workflow_executions`` table: one row per ``n8n.execute`` job, keyed by its job id.

The row is the job's memory between deliveries. It is claimed (``INSERT ... ON CONFLICT DO
NOTHING``) *before* the webhook is called, so a redelivered job finds it and never triggers the
workflow a second time. Every later change is a conditional ``UPDATE`` on the status it expects,
so two deliveries of one job (or a job and the reconciler) cannot both finish it.

Statuses: ours — ``triggering`` (claimed, the webhook call may be under way), ``not_triggered``
(n8n cannot have started it: refused, unreachable, circuit open; claimable again),
``outcome_unknown`` (it may or may not have run; never triggered again) — then n8n's own:
``new``, ``running``, ``waiting``, ``unknown`` while it runs, and ``success``, ``error``,
``canceled``, ``crashed`` at its end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from workers.store.models import WorkflowExecution

TRIGGERING = "triggering"
NOT_TRIGGERED = "not_triggered"
OUTCOME_UNKNOWN = "outcome_unknown"
#: n8n's statuses of an execution that has not ended: a job (or the reconciler) follows it.
FOLLOWING: frozenset[str] = frozenset({"new", "running", "waiting", "unknown"})
#: n8n's end statuses, plus ours for a run we will never learn about.
FINISHED: frozenset[str] = frozenset({"success", "error", "canceled", "crashed", OUTCOME_UNKNOWN})

_table = cast(Table, WorkflowExecution.__table__)
_c = _table.c


@dataclass(frozen=True)
class ExecutionRow:
    job_id: str
    workflow: str
    mode: str
    status: str
    #: The job's payload (workflow, data sent as the body, mode, timeout, attribution).
    input: dict[str, Any]
    n8n_execution_id: str | None = None
    output: Any = None
    error: str | None = None
    error_node: str | None = None
    triggered_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


_FIELDS = tuple(ExecutionRow.__dataclass_fields__)


def _row(mapping: Any) -> ExecutionRow:
    return ExecutionRow(**{name: mapping[name] for name in _FIELDS})


def _columns() -> list[Any]:
    return [_c[name] for name in _FIELDS]


def claim(
    engine: Engine,
    job_id: str,
    *,
    workflow: str,
    mode: str,
    input: dict[str, Any],
    now: datetime,
    deadline_at: datetime,
) -> tuple[ExecutionRow, bool]:
    """The job's row, and whether this caller now owns the trigger.

    True for a new row, or one left ``not_triggered`` by an earlier attempt (taken back to
    ``triggering`` atomically). False when the row exists in any other state: the caller must
    resume from it, never trigger.
    """
    with engine.begin() as conn:
        inserted = conn.execute(
            pg_insert(_table)
            .values(
                job_id=job_id,
                workflow=workflow,
                mode=mode,
                status=TRIGGERING,
                input=input,
                triggered_at=now,
                deadline_at=deadline_at,
            )
            .on_conflict_do_nothing(index_elements=["job_id"])
            .returning(*_columns())
        ).first()
        if inserted is not None:
            return _row(inserted._mapping), True
        reclaimed = conn.execute(
            update(_table)
            .where(_c.job_id == job_id, _c.status == NOT_TRIGGERED)
            .values(status=TRIGGERING, error=None, triggered_at=now)
            .returning(*_columns())
        ).first()
        if reclaimed is not None:
            return _row(reclaimed._mapping), True
        existing = conn.execute(select(*_columns()).where(_c.job_id == job_id)).one()
        return _row(existing._mapping), False


def get(engine: Engine, job_id: str) -> ExecutionRow | None:
    with engine.connect() as conn:
        found = conn.execute(select(*_columns()).where(_c.job_id == job_id)).first()
    return _row(found._mapping) if found is not None else None


def transition(
    engine: Engine, job_id: str, *, expected: Iterable[str], **values: Any
) -> ExecutionRow | None:
    """Set ``values`` if the row's status is one of ``expected``; the new row, or None when
    another delivery (or the reconciler) moved it first."""
    with engine.begin() as conn:
        changed = conn.execute(
            update(_table)
            .where(_c.job_id == job_id, _c.status.in_(list(expected)))
            .values(**values)
            .returning(*_columns())
        ).first()
    return _row(changed._mapping) if changed is not None else None


def due_for_reconcile(engine: Engine, *, before: datetime, limit: int) -> list[ExecutionRow]:
    """Executions still running whose job stopped following them (deadline before ``before``),
    oldest deadline first."""
    query = (
        select(*_columns())
        .where(
            _c.status.in_(sorted(FOLLOWING)),
            _c.n8n_execution_id.is_not(None),
            _c.deadline_at < before,
        )
        .order_by(_c.deadline_at)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [_row(r._mapping) for r in conn.execute(query)]


__all__ = [
    "FINISHED",
    "FOLLOWING",
    "NOT_TRIGGERED",
    "OUTCOME_UNKNOWN",
    "TRIGGERING",
    "ExecutionRow",
    "claim",
    "due_for_reconcile",
    "get",
    "transition",
]
