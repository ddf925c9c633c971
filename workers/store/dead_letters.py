"""Writing and reading ``dead_letters``: jobs that failed for good, kept to inspect and resubmit.

A dead letter must survive a Postgres outage too: when the insert fails, the row is pushed onto
a Redis list (``conveyor.keys.DEAD_LETTER_SPILL``) and ``maintenance.flush_dead_letters`` moves it
to Postgres once the database is back.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
import sqlalchemy.exc
from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from conveyor import keys
from workers.store.models import DeadLetter

log = logging.getLogger(__name__)


def record(engine: Engine, spill: redis.Redis, row: dict[str, Any]) -> bool:
    """Store one dead letter; True when it reached Postgres, False when it was spilled to Redis.

    Idempotent on ``job_id``: a job dead-lettered twice (redelivered) keeps its first row.
    """
    try:
        _insert(engine, [row])
        return True
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        log.warning(
            "Postgres unavailable, dead letter of job %s kept in Redis: %s", row["job_id"], exc
        )
        spill.rpush(keys.DEAD_LETTER_SPILL, json.dumps(row, default=str))
        return False


def flush_spill(engine: Engine, spill: redis.Redis, *, batch: int = 500) -> int:
    """Move spilled dead letters into Postgres; returns how many moved.

    Rows are removed from Redis only after the transaction that holds them commits; a lock
    keeps two flushers from trimming each other's rows.
    """
    lock = spill.lock(keys.DEAD_LETTER_FLUSH_LOCK, timeout=120, blocking=False)
    if not lock.acquire():
        return 0
    moved = 0
    try:
        while raw := spill.lrange(keys.DEAD_LETTER_SPILL, 0, batch - 1):
            _insert(engine, [json.loads(item) for item in raw])
            spill.ltrim(keys.DEAD_LETTER_SPILL, len(raw), -1)
            moved += len(raw)
        return moved
    finally:
        lock.release()


def _insert(engine: Engine, rows: list[dict[str, Any]]) -> None:
    statement = pg_insert(DeadLetter).values(rows).on_conflict_do_nothing(index_elements=["job_id"])
    with engine.begin() as conn:
        conn.execute(statement)


def find(engine: Engine, job_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(DeadLetter.__table__).where(DeadLetter.job_id == job_id)).first()
    return dict(row._mapping) if row else None


__all__ = ["find", "flush_spill", "record"]
