"""Writing and reading ``episodic_logs``: batched idempotent inserts, queries, recall, retention.

Plain functions over a SQLAlchemy engine or a psycopg2 connection; nothing here knows Celery.

- ``insert_episodes`` writes a batch in one round trip (a multi-row ``INSERT ... ON CONFLICT
  (episode_id) DO NOTHING``), so a redelivered or resubmitted episode is a no-op. A row the
  database refuses is isolated by splitting the batch in halves, so it alone is rejected.
- ``query_episodes`` filters, searches (the generated ``search`` tsvector, GIN-indexed) and
  pages newest first with an opaque keyset cursor.
- ``recent_episodes`` recalls a session's last episodes within a token budget.
- ``delete_older_than`` is the retention job: bounded chunks, one short transaction each.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg2
from psycopg2.extras import execute_values
from sqlalchemy import Engine, Table, and_, delete, func, select, tuple_

from conveyor.schemas.episodes import EpisodePayload
from workers.store.models import EpisodicLog

_COLUMNS = (
    "episode_id",
    "timestamp",
    "user_id",
    "session_id",
    "model_type",
    "prompt",
    "response",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "tokens_estimated",
    "latency_ms",
    "status",
    "job_id",
    "metadata",
    "tenant",
)
#: One row of VALUES: an episode without a timestamp happened when its batch is written.
_TEMPLATE = (
    "(%s, COALESCE(%s, now()), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)"
)
_INSERT = (
    f"INSERT INTO episodic_logs ({', '.join(_COLUMNS)}) VALUES %s "
    "ON CONFLICT (episode_id) DO NOTHING RETURNING episode_id"
)

#: Errors that belong to one row's values (a bad character, a number out of range, a broken
#: constraint), not to the database or the connection: the batch is split to find the row.
_ROW_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError, ValueError)

Row = tuple[Any, ...]


def episode_row(payload: EpisodePayload, *, episode_id: str, tenant: str | None = None) -> Row:
    """The VALUES tuple of one validated episode. A timestamp without a zone is taken as UTC;
    ``tenant`` is whose it is (from its message's headers, never from the payload)."""
    stamp = payload.timestamp
    if stamp is not None and stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    tokens = payload.tokens
    return (
        episode_id,
        stamp,
        payload.user_id,
        payload.session_id,
        payload.model_type,
        payload.prompt,
        payload.response,
        tokens.prompt,
        tokens.completion,
        tokens.total or tokens.prompt + tokens.completion,
        tokens.estimated,
        payload.latency_ms,
        payload.status,
        payload.job_id,
        json.dumps(payload.metadata, ensure_ascii=False, default=str),
        tenant,
    )


@dataclass
class InsertResult:
    """What became of each row of a batch, by its index in the batch."""

    #: Written now.
    inserted: list[int] = field(default_factory=list)
    #: Already there (a redelivery or a resubmission): nothing written.
    duplicates: list[int] = field(default_factory=list)
    #: Refused by the database for their own values: index -> the database's error.
    rejected: dict[int, str] = field(default_factory=dict)
    #: Statements sent: 1 unless a refused row had to be isolated.
    statements: int = 0


def insert_episodes(conn: Any, rows: Sequence[Row]) -> InsertResult:
    """Write ``rows`` through ``conn`` (psycopg2, in autocommit mode: each statement is its own
    transaction, so a batch costs one round trip).

    Connection and server errors (``psycopg2.OperationalError``, ``InterfaceError``) propagate:
    nothing is known to be written, and writing the batch again is safe.
    """
    result = InsertResult()
    _insert_part(conn, rows, list(range(len(rows))), result)
    return result


def _insert_part(conn: Any, rows: Sequence[Row], where: list[int], result: InsertResult) -> None:
    part = [rows[i] for i in where]
    result.statements += 1
    try:
        with conn.cursor() as cur:
            written = execute_values(cur, _INSERT, part, _TEMPLATE, page_size=len(part), fetch=True)
    except _ROW_ERRORS as exc:
        if len(where) == 1:
            result.rejected[where[0]] = f"{type(exc).__name__}: {str(exc).strip()}"
            return
        middle = len(where) // 2
        _insert_part(conn, rows, where[:middle], result)
        _insert_part(conn, rows, where[middle:], result)
        return
    new = {episode_id for (episode_id,) in written}
    for i, row in zip(where, part, strict=True):
        # The same id twice in one batch: the first is written, the second is a duplicate.
        if row[0] in new:
            new.discard(row[0])
            result.inserted.append(i)
        else:
            result.duplicates.append(i)


# --- Reading back -----------------------------------------------------------------------------

_TABLE = cast(Table, EpisodicLog.__table__)
_c = _TABLE.c


@dataclass(frozen=True)
class EpisodePage:
    episodes: list[dict[str, Any]]
    #: Pass back as ``cursor`` for the next (older) page; None on the last page.
    next_cursor: str | None


#: A search's size: each word is one more index lookup and intersection in Postgres (a
#: 100,000-word search held the database for ~10 s).
MAX_SEARCH_WORDS = 32
MAX_SEARCH_CHARS = 1000


class BadCursor(ValueError):
    """A cursor that ``query_episodes`` did not hand out."""


def query_episodes(
    engine: Engine,
    *,
    tenant: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    model_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    status: str | None = None,
    search: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    exact_tenant: bool = False,
) -> EpisodePage:
    """Episodes newest first (by ``timestamp``, then id), at most ``limit`` (1-1000) a page;
    only ``tenant``'s when given (None: every tenant's, the operator's view).

    ``since`` is inclusive, ``until`` exclusive. ``search`` is web-search syntax over prompt and
    response (words, ``"a phrase"``, ``or``, ``-excluded``), matched on whole words.
    """
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be from 1 to 1000, not {limit}")
    if search is not None and (
        len(search) > MAX_SEARCH_CHARS or len(search.split()) > MAX_SEARCH_WORDS
    ):
        raise ValueError(
            f"search must be at most {MAX_SEARCH_WORDS} words and {MAX_SEARCH_CHARS} characters"
        )
    conditions = []
    if exact_tenant:  # None means no tenant's, not every tenant's
        conditions.append(_c.tenant.is_not_distinct_from(tenant))
        tenant = None
    for column, value in (
        (_c.tenant, tenant),
        (_c.user_id, user_id),
        (_c.session_id, session_id),
        (_c.model_type, model_type),
        (_c.status, status),
    ):
        if value is not None:
            conditions.append(column == value)
    if since is not None:
        conditions.append(_c.timestamp >= _aware(since))
    if until is not None:
        conditions.append(_c.timestamp < _aware(until))
    if search:
        conditions.append(_c.search.op("@@")(func.websearch_to_tsquery("simple", search)))
    if cursor is not None:
        stamp, last_id = _decode_cursor(cursor)
        conditions.append(tuple_(_c.timestamp, _c.id) < tuple_(stamp, last_id))
    statement = (
        select(_TABLE)
        .where(and_(True, *conditions))
        .order_by(_c.timestamp.desc(), _c.id.desc())
        .limit(limit + 1)
    )
    with engine.connect() as conn:
        rows = conn.execute(statement).all()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor(rows[-1].timestamp, rows[-1].id) if more else None
    return EpisodePage([_episode(row) for row in rows], next_cursor)


def iter_episodes(engine: Engine, **filters: Any) -> Iterator[dict[str, Any]]:
    """Every episode matching ``query_episodes``' filters, newest first, page after page."""
    cursor = filters.pop("cursor", None)
    while True:
        page = query_episodes(engine, cursor=cursor, **filters)
        yield from page.episodes
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def _episode(row: Any) -> dict[str, Any]:
    """An episode as JSON-ready data, in the shape ``episodes.record`` accepts."""
    return {
        "episode_id": row.episode_id,
        "timestamp": _iso(row.timestamp),
        "user_id": row.user_id,
        "session_id": row.session_id,
        "model_type": row.model_type,
        "prompt": row.prompt,
        "response": row.response,
        "tokens": {
            "prompt": row.prompt_tokens,
            "completion": row.completion_tokens,
            "total": row.total_tokens,
            "estimated": row.tokens_estimated,
        },
        "latency_ms": row.latency_ms,
        "status": row.status,
        "job_id": row.job_id,
        "metadata": row.metadata,
        "created_at": _iso(row.created_at),
    }


def _encode_cursor(stamp: datetime, row_id: int) -> str:
    raw = json.dumps([stamp.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, row_id = json.loads(raw)
        if not isinstance(row_id, int) or isinstance(row_id, bool) or not 0 <= row_id < 2**63:
            raise ValueError("not a row id")
        return datetime.fromisoformat(stamp), row_id
    except (binascii.Error, ValueError, TypeError, OverflowError) as exc:
        raise BadCursor(f"not a cursor from this listing: {cursor!r}") from exc


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """``2026-11-20T10:00:00Z`` (ISO 8601; no zone means UTC), or an age back from now:
    ``90s``, ``30m``, ``12h``, ``7d``."""
    text = text.strip()
    unit = _AGE_UNITS.get(text[-1:].lower())
    if unit is not None and text[:-1].replace(".", "", 1).isdigit():
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=float(text[:-1]) * unit)
        except (OverflowError, ValueError):
            raise ValueError(f"not a time: {text!r} reaches before the year 1") from None
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use ISO 8601, e.g. 2026-11-20T10:00:00Z, or an age: 30m, 7d)"
        ) from None


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- Recall -----------------------------------------------------------------------------------


def recent_episodes(
    engine: Engine,
    session_id: str,
    n: int,
    token_budget: int,
    *,
    count_tokens: Callable[[str], int],
    status: str | None = "success",
    tenant: str | None = None,
) -> list[dict[str, Any]]:
    """The session's last ``n`` episodes that fit in ``token_budget``, oldest first (the order
    to prepend them as context).

    Counting back from the newest, an episode costs ``count_tokens(prompt) +
    count_tokens(response)``; recall stops at the first one that would overrun the budget, so
    what comes back is always the most recent stretch of the conversation, never one with a
    gap. Only episodes with ``status`` (default ``success``; None for any) are recalled, and
    only ``tenant``'s (None: those of no tenant), so one tenant's conversation never becomes
    another's context.
    """
    if n <= 0 or token_budget <= 0:
        return []
    page = query_episodes(
        engine,
        session_id=session_id,
        status=status,
        limit=min(n, 1000),
        tenant=tenant,
        exact_tenant=True,
    )
    chosen: list[dict[str, Any]] = []
    spent = 0
    for episode in page.episodes:
        cost = count_tokens(episode["prompt"]) + count_tokens(episode["response"])
        if spent + cost > token_budget:
            break
        spent += cost
        chosen.append(episode)
    chosen.reverse()
    return chosen


# --- Retention --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionResult:
    deleted: int
    #: Statements (one short transaction each).
    chunks: int
    #: False when the time budget ran out with old episodes left (the next run goes on).
    finished: bool
    cutoff: datetime


def delete_older_than(
    engine: Engine,
    *,
    days: int,
    chunk: int = 5000,
    budget_s: float = 60.0,
    now: datetime | None = None,
) -> RetentionResult:
    """Delete episodes whose ``timestamp`` is more than ``days`` days old.

    At most ``chunk`` rows a statement, each statement its own transaction, so no lock is held
    for long and writers carry on between chunks; stops after ``budget_s`` seconds, leaving the
    rest to the next run. ``SKIP LOCKED`` lets two runs (or a run and a writer) pass each other.
    """
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    doomed = (
        select(_c.id)
        .where(_c.timestamp < cutoff)
        .limit(chunk)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    statement = delete(_TABLE).where(_c.id.in_(doomed))
    deadline = time.monotonic() + budget_s
    deleted = chunks = 0
    while True:
        with engine.begin() as conn:
            count = conn.execute(statement).rowcount
        chunks += 1
        deleted += count
        if count < chunk:
            return RetentionResult(deleted, chunks, True, cutoff)
        if time.monotonic() >= deadline:
            return RetentionResult(deleted, chunks, False, cutoff)


__all__ = [
    "BadCursor",
    "EpisodePage",
    "InsertResult",
    "RetentionResult",
    "delete_older_than",
    "episode_row",
    "insert_episodes",
    "iter_episodes",
    "parse_time",
    "query_episodes",
    "recent_episodes",
]
