"""The episodes pool's batch function: validate each record, write the valid ones in one round
trip, dead-letter what can never be written, and say which records must wait for Postgres.

It runs in a pool process (``workers.runtime.batching`` hands it the batches) and holds one
autocommit connection per process, replaced after any connection error: a batch is one
``INSERT`` and one round trip, with no pool check-out, ``BEGIN`` or ``COMMIT`` around it.
"""

from __future__ import annotations

import logging
import threading
from contextlib import suppress
from typing import Any, cast

import psycopg2

from conveyor.errors import PayloadError
from conveyor.names import EPISODES
from conveyor.schemas import validate_payload
from conveyor.schemas.episodes import EpisodePayload
from workers import settings
from workers.episodes.outbox import episode_id_for
from workers.failures import Retryable, classify
from workers.runtime import connections, outcome
from workers.runtime.context import BatchContext, Item, Verdict
from workers.store.episodes import episode_row, insert_episodes

log = logging.getLogger(__name__)


def write_batch(ctx: BatchContext, items: list[Item]) -> Verdict:
    """Settle every record of ``items`` but those waiting for Postgres (``Verdict.retry``).

    A record without an ``episode_id`` gets one derived from its job id, so a redelivered
    message writes nothing twice. A payload that fails its schema is poison; a row Postgres
    refuses for its own values is permanent: both are dead-lettered, the rest is written.
    """
    max_bytes = settings.core().max_payload_bytes
    retry: list[int] = []
    rows: list[tuple[Any, ...]] = []
    rows_ids: list[str] = []
    where: list[int] = []
    for i, item in enumerate(items):
        try:
            payload = cast(
                EpisodePayload,
                validate_payload(ctx.task_name, item.payload, max_bytes=max_bytes),
            )
        except PayloadError as exc:
            _fail(ctx, item, "poison", str(exc), i, retry)
            continue
        episode_id = payload.episode_id or episode_id_for(item.job_id)
        if payload.episode_id and item.origin.tenant:
            # A tenant's own ids live in its own space: another tenant cannot take them first.
            episode_id = f"{item.origin.tenant}:{payload.episode_id}"
        rows.append(episode_row(payload, episode_id=episode_id, tenant=item.origin.tenant))
        rows_ids.append(episode_id)
        where.append(i)
    if not rows:
        return Verdict(retry=tuple(retry), reason="could not dead-letter")
    try:
        result = insert_episodes(_connection.get(), rows)
    except Exception as exc:
        if not _is_outage(exc):
            raise
        _connection.discard()
        return Verdict(
            retry=tuple(sorted(retry + where)),
            reason=f"Postgres unavailable: {type(exc).__name__}: {str(exc).strip()}",
        )
    for j, error in result.rejected.items():
        _fail(
            ctx, items[where[j]], "permanent", f"Postgres refused the row: {error}", where[j], retry
        )
    seen = set(result.duplicates)
    # Each written (or already written) record's result: `Job.result()` and `--wait` see it.
    outcome.settle_quietly(
        [
            (items[where[j]].job_id, {"episode_id": rows_ids[j], "written": j not in seen})
            for j in sorted([*result.inserted, *result.duplicates])
        ]
    )
    level = logging.INFO if result.duplicates or result.rejected else logging.DEBUG
    log.log(
        level,
        "%s: batch of %d: %d written, %d already there, %d refused, %d poison (%d statements)",
        ctx.task_name,
        len(items),
        len(result.inserted),
        len(result.duplicates),
        len(result.rejected),
        len(items) - len(rows),
        result.statements,
    )
    return Verdict(retry=tuple(retry), reason="could not dead-letter")


def _fail(ctx: BatchContext, item: Item, reason: str, error: str, i: int, retry: list[int]):
    try:
        ctx.fail(item, reason, error)
    except Exception:
        log.exception("could not dead-letter job %s; it waits and goes again", item.job_id)
        retry.append(i)


def _is_outage(exc: Exception) -> bool:
    """The database or the way to it failed, not this batch: the same batch may succeed later.
    (psycopg2's own errors are not wrapped by SQLAlchemy on this raw connection.)"""
    if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return True
    return isinstance(classify(exc), Retryable)


class _Connection:
    """One autocommit psycopg2 connection per process (per thread, for the threads pool)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Any:
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = connections.engine().raw_connection()
            try:
                dbapi: Any = proxy.driver_connection
                dbapi.rollback()  # the pool's liveness ping may have opened a transaction
                dbapi.autocommit = True
                with dbapi.cursor() as cur:
                    # A hung statement fails (and is retried) well before the soft time limit.
                    soft_s = settings.pool(EPISODES).soft_time_limit_s
                    cur.execute("SET statement_timeout = %s", (int(soft_s * 500),))
            except Exception:
                with suppress(Exception):
                    proxy.invalidate()
                raise
            self._local.proxy = proxy
        return proxy.driver_connection

    def discard(self) -> None:
        proxy = getattr(self._local, "proxy", None)
        self._local.proxy = None
        if proxy is not None:
            with suppress(Exception):
                proxy.invalidate()


_connection = _Connection()
