"""Tasks only ``bench.episodes`` uses, beside ``episodes.record``, on the same episodes pool.

A worker loads them with ``conveyor worker episodes -I bench.episodes_tasks``; the benchmark
sends them by name to the ``episodes`` queue. Not public tasks: no schema, no route.

- ``bench.episodes_noop``: the batching mechanism of ``episodes.record`` with nothing to do;
  what the pool costs when the database costs nothing.
- ``bench.episode_one_row``: the baseline, a plain Celery task inserting one row per message
  (validated with the same schema, one transaction each, ``ON CONFLICT DO NOTHING``).
- ``bench.noop``: a plain Celery task that does nothing: Celery's own floor per message.
"""

from __future__ import annotations

from typing import Any

from conveyor.schemas import validate_payload
from workers import settings
from workers.app import app
from workers.episodes.outbox import episode_id_for
from workers.runtime import connections
from workers.runtime.batching import BatchContext, Item, Verdict, batch_job
from workers.store.episodes import _COLUMNS, _TEMPLATE, episode_row

_ONE_ROW = (
    f"INSERT INTO episodic_logs ({', '.join(_COLUMNS)}) VALUES {_TEMPLATE} "
    "ON CONFLICT (episode_id) DO NOTHING"
)


@batch_job("bench.episodes_noop", family="episodes")
def episodes_noop(ctx: BatchContext, items: list[Item]) -> Verdict:
    return Verdict()


@app.task(name="bench.episode_one_row", bind=True, ignore_result=True, track_started=False)
def episode_one_row(task: Any, payload: dict[str, Any]) -> None:
    valid = validate_payload(
        "episodes.record", payload, max_bytes=settings.core().max_payload_bytes
    )
    row = episode_row(valid, episode_id=valid.episode_id or episode_id_for(task.request.id))
    with connections.engine().begin() as conn:
        conn.exec_driver_sql(_ONE_ROW, row)


@app.task(name="bench.noop", ignore_result=True, track_started=False)
def noop(payload: dict[str, Any]) -> None:
    return None
