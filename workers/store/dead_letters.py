"""Writing and reading ``dead_letters``: jobs that failed for good, kept to inspect and resubmit.

A dead letter must survive a Postgres outage too: when the insert fails, the row is pushed onto
a Redis list (``conveyor.keys.DEAD_LETTER_SPILL``) and ``maintenance.flush_dead_letters`` moves it
to Postgres once the database is back.

A dead letter must also survive its own contents: the payloads that end here are often the ones
that broke the rules (NaN, a NUL character, a lone surrogate, nesting no encoder can follow), and
Postgres refuses those in ``jsonb`` and ``text``. So every row is made storable first, losing
nothing a person needs: a payload that is not storable JSON is kept as its JSON text,
``{"unstorable_json": "...", "why": "..."}`` (``json.loads`` gives the original back), and a
text column holding NUL or a lone surrogate keeps it as a visible escape (``\\u0000``,
``\\udc80``). One bad row never blocks the spill: a batch Postgres refuses is written row by row,
and a row still refused is stored in its barest form, with the database's reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import redis
import sqlalchemy.exc
from sqlalchemy import ColumnElement, Engine, Table, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from conveyor import keys
from conveyor.envelopes import iso_ms
from conveyor.schemas.storable import INT32_MAX, json_problems
from workers.store.episodes import parse_time
from workers.store.models import DeadLetter

log = logging.getLogger(__name__)

#: The database or the way to it failed, not the row: the row waits in Redis.
_OUTAGE = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
_TEXT_COLUMNS = (
    "job_id",
    "task",
    "queue",
    "reason",
    "error",
    "resubmitted_job_id",
    "tenant",
    "request_id",
    "traceparent",
)
#: Text columns a bare row keeps as they are (or None): whose it is, and where it came from.
_BARE_OPTIONAL = ("queue", "tenant", "request_id", "traceparent")
#: What a bare row keeps in its columns; the rest of the row goes inside its payload.
_BARE = frozenset(("job_id", "task", "payload", "reason", "error", *_BARE_OPTIONAL))


def record(engine: Engine, spill: redis.Redis, row: dict[str, Any]) -> bool:
    """Store one dead letter; True when it reached Postgres, False when it was spilled to Redis.

    Idempotent on ``job_id``: a job dead-lettered twice (redelivered) keeps its first row.
    Whatever the row holds, it is stored (see the module's docstring); only an outage of both
    Postgres and Redis raises.
    """
    safe = storable_row(row)
    try:
        _insert_each(engine, [safe])
        return True
    except _OUTAGE as exc:
        log.warning(
            "Postgres unavailable, dead letter of job %s kept in Redis: %s", safe.get("job_id"), exc
        )
        # When it failed, not when the flush moves it.
        spilled = {"failed_at": datetime.now(UTC).isoformat(), **safe}
        spill.rpush(keys.DEAD_LETTER_SPILL, _spill_text(spilled))
        return False


def flush_spill(engine: Engine, spill: redis.Redis, *, batch: int = 500) -> int:
    """Move spilled dead letters into Postgres; returns how many moved.

    Rows are removed from Redis only after the transactions that hold them commit; a lock
    keeps two flushers from trimming each other's rows. A batch Postgres refuses is written
    row by row, so one bad row (even one that is not JSON) holds nothing up; only an outage
    stops the flush, leaving the rest for the next run.
    """
    lock = spill.lock(keys.DEAD_LETTER_FLUSH_LOCK, timeout=120, blocking=False)
    if not lock.acquire():
        return 0
    moved = 0
    try:
        while raw := spill.lrange(keys.DEAD_LETTER_SPILL, 0, batch - 1):
            rows = [_from_spill(item) for item in raw]
            try:
                _insert(engine, rows)
            except _OUTAGE:
                raise
            except Exception as exc:  # a row's values (or rows of different shapes)
                log.warning("spilled dead letters refused as a batch, moving one by one: %s", exc)
                _insert_each(engine, rows)
            spill.ltrim(keys.DEAD_LETTER_SPILL, len(raw), -1)
            moved += len(raw)
        return moved
    finally:
        lock.release()


# --- Making a row storable ----------------------------------------------------------------------


def storable_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as Postgres stores it: text columns without NUL or lone surrogates (escaped, so
    still readable), a payload that is storable ``jsonb`` (else wrapped as its JSON text)."""
    safe = dict(row)
    for column in _TEXT_COLUMNS:
        value = safe.get(column)
        if value is not None:
            safe[column] = storable_text(value if isinstance(value, str) else str(value))
    if "payload" in safe:
        safe["payload"] = storable_json(safe["payload"])
    return safe


def storable_text(text: str) -> str:
    """``text`` with NUL written ``\\u0000`` and each lone surrogate ``\\udXXX``."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode()
    return text


def storable_json(value: Any) -> Any:
    """``value`` itself when ``jsonb`` stores it as it is, else ``{"unstorable_json": its JSON
    text (non-standard ``NaN``/``Infinity`` included), "why": the first problem}``.

    Integers beyond 64 bits are storable (``jsonb`` numbers are arbitrary precision); the depth
    limit is the submitter's, so a payload no encoder can follow is kept as text.
    """
    problems = json_problems(value, int64=False, limit=1)
    if not problems:
        return value
    return {"unstorable_json": json_text(value), "why": storable_text(str(problems[0]))}


def json_text(value: Any) -> str:
    """``value`` as JSON text, whatever it holds, without recursion: NUL and lone surrogates
    are escaped (``\\u0000``, ``\\udc80``), non-finite floats are written as Python's ``json``
    writes them (``NaN``, ``Infinity``), anything else JSON cannot hold as its ``str()``.
    ``json.loads`` of the text gives the value back (a tuple as a list)."""
    out: list[str] = []
    # Work items: a value to write, a piece of text to copy (``_Piece``), or the end of a
    # container (``_Done``: a container met again before its end is a cycle).
    work: list[Any] = [value]
    open_ids: set[int] = set()
    while work:
        item = work.pop()
        kind = type(item)
        if kind is _Piece:
            out.append(item)
        elif kind is _Done:
            open_ids.discard(item.id)
        elif isinstance(item, dict | list | tuple):
            if id(item) in open_ids:
                out.append('"<circular reference>"')
                continue
            open_ids.add(id(item))
            work.append(_Done(id(item)))
            if isinstance(item, dict):
                entries = list(item.items())
                work.append(_Piece("}"))
                for i in range(len(entries) - 1, -1, -1):
                    key, child = entries[i]
                    work.append(child)
                    work.append(_Piece(_string(_key_text(key)) + ":"))
                    if i:
                        work.append(_Piece(","))
                work.append(_Piece("{"))
            else:
                work.append(_Piece("]"))
                for i in range(len(item) - 1, -1, -1):
                    work.append(item[i])
                    if i:
                        work.append(_Piece(","))
                work.append(_Piece("["))
        else:
            out.append(_scalar_text(item))
    return "".join(out)


class _Done(NamedTuple):
    id: int


class _Piece(str):
    """Text ``json_text`` copies as it is (a ``str`` payload value is written as a string)."""


def _string(text: str) -> str:
    # json escapes NUL and control characters; a lone surrogate comes out as its JSON escape.
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return _scalar_text(key)  # as json writes keys: "true", "null", "1", "NaN"
    return str(key)


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        return _string(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        try:
            return int.__repr__(value)
        except ValueError:  # over Python's int-to-text digit limit
            return _string(f"<integer {hex(value)}>")
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return float.__repr__(value)
    return _string(str(value))


def _spill_text(row: dict[str, Any]) -> str:
    """The row as JSON for the spill list; never raises (the row is storable already, and
    anything else falls back to its barest form)."""
    try:
        return json.dumps(row, default=str, allow_nan=True, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError) as exc:
        return json.dumps(_bare(row, f"{type(exc).__name__}: {exc}"), default=str)


def _from_spill(item: bytes | str) -> dict[str, Any]:
    """A spilled row, storable; an item that is not one (garbled, or not an object) becomes a
    dead letter of its own, keyed by its digest so a second flush does not store it twice."""
    try:
        row = json.loads(item)
        if isinstance(row, dict) and "job_id" in row:
            return storable_row(row)
        why = "not a dead letter (a JSON object with a job_id)"
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        why = f"not JSON: {type(exc).__name__}: {exc}"
    raw = item if isinstance(item, bytes) else item.encode("utf-8", "surrogatepass")
    return {
        "job_id": "spill-" + hashlib.sha256(raw).hexdigest()[:32],
        "task": "unknown",
        "queue": None,
        "payload": {
            "unstorable_json": storable_text(raw.decode("utf-8", "backslashreplace")),
            "why": why,
        },
        "reason": "unreadable",
        "error": f"a dead letter spilled to Redis could not be read back: {why}",
        "attempts": 1,
    }


# --- Writing ------------------------------------------------------------------------------------


def _insert(engine: Engine, rows: list[dict[str, Any]]) -> None:
    statement = pg_insert(DeadLetter).values(rows).on_conflict_do_nothing(index_elements=["job_id"])
    with engine.begin() as conn:
        conn.execute(statement)


def _insert_each(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Each row in a transaction of its own; a row Postgres refuses for its values (a column
    that is missing or of the wrong type, a time it cannot read) goes in its barest form."""
    for row in rows:
        try:
            _insert(engine, [row])
        except _OUTAGE:
            raise
        except Exception as exc:
            log.warning("dead letter of job %r refused, stored bare: %s", row.get("job_id"), exc)
            _insert(engine, [_bare(row, f"{type(exc).__name__}: {exc}")])


def _bare(row: dict[str, Any], refused: str) -> dict[str, Any]:
    """Only what every row can hold: text (escaped), a whole number of attempts, the payload
    as its JSON text, and the rest of the row (and why Postgres refused it) beside it. The
    tenant stays a column: a bare row is still seen by its tenant only."""
    job_id = row.get("job_id")
    if job_id is None:
        job_id = "bare-" + hashlib.sha256(json_text(row).encode()).hexdigest()[:32]
    attempts = row.get("attempts")
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        attempts = 1
    payload = row.get("payload")
    why = f"Postgres refused the row: {refused}"[:2000]
    if isinstance(payload, dict) and payload.keys() == {"unstorable_json", "why"}:
        text, why = str(payload["unstorable_json"]), f"{payload['why']}; {why}"  # wrapped already
    else:
        text = json_text(payload)
    return {
        "job_id": storable_text(str(job_id)),
        "task": storable_text(str(row.get("task") or "unknown")),
        **{
            column: None if row.get(column) is None else storable_text(str(row[column]))
            for column in _BARE_OPTIONAL
        },
        "payload": {
            "unstorable_json": storable_text(text),
            "why": storable_text(why),
            "row": storable_text(json_text({k: v for k, v in row.items() if k not in _BARE})),
        },
        "reason": storable_text(str(row.get("reason") or "unknown")),
        "error": storable_text(str(row.get("error") or "")),
        "attempts": min(max(attempts, 0), INT32_MAX),
    }


def find(engine: Engine, job_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(DeadLetter.__table__).where(DeadLetter.job_id == job_id)).first()
    return dict(row._mapping) if row else None


# --- Reading, for people ------------------------------------------------------------------------
#
# ``tenant`` is a required keyword everywhere below: None is the operator's view (every row,
# tenants' and tenantless alike), a string only that tenant's rows. No default, so a caller
# serving a tenant cannot forget to pass it.

_table = cast(Table, DeadLetter.__table__)
_c = _table.c

#: A listing's columns; the payload (up to the submitter's size limit each) only in ``get``.
_SUMMARY = (
    _c.job_id,
    _c.task,
    _c.queue,
    _c.reason,
    _c.error,
    _c.attempts,
    _c.failed_at,
    _c.resubmitted_at,
    _c.resubmitted_job_id,
    _c.tenant,
    _c.request_id,
    _c.traceparent,
)
MAX_LIST = 1000

#: A time as a ``datetime`` (no zone: UTC) or as text ``parse_time`` reads (ISO 8601 or an age
#: such as ``15m``, ``2h``, ``7d``); text it cannot read raises ``ValueError``.
When = datetime | str


def list_dead_letters(
    engine: Engine,
    *,
    tenant: str | None,
    task: str | None = None,
    reason: str | None = None,
    since: When | None = None,
    until: When | None = None,
    resubmitted: bool | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Dead letters newest first (by ``failed_at``, then id), at most ``limit`` (1-1000), as
    JSON-ready dicts without their payloads. ``since`` is inclusive, ``until`` exclusive;
    ``resubmitted`` True or False keeps only the rows that were (or were not) sent again."""
    if not 1 <= limit <= MAX_LIST:
        raise ValueError(f"limit must be from 1 to {MAX_LIST}, not {limit}")
    statement = (
        select(*_SUMMARY)
        .where(*_conditions(tenant, task, reason, since, until, resubmitted))
        .order_by(_c.failed_at.desc(), _c.id.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        return [_shown(row) for row in conn.execute(statement)]


def get_dead_letter(engine: Engine, job_id: str, *, tenant: str | None) -> dict[str, Any] | None:
    """One dead letter with its payload; None when there is none, or it is another tenant's
    (the two must look alike to a tenant)."""
    statement = select(*_SUMMARY, _c.payload).where(
        _c.job_id == storable_text(job_id), *_conditions(tenant, None, None, None, None, None)
    )
    with engine.connect() as conn:
        row = conn.execute(statement).first()
    return None if row is None else _shown(row)


def purge_dead_letters(
    engine: Engine, *, before: When, tenant: str | None, dry_run: bool = False
) -> int:
    """Delete the dead letters that failed before ``before``; how many went (with
    ``dry_run``: how many would go, deleting nothing)."""
    conditions = _conditions(tenant, None, None, None, before, None)
    with engine.begin() as conn:
        if dry_run:
            counted = conn.execute(select(func.count()).select_from(_table).where(*conditions))
            return int(counted.scalar_one())
        return int(conn.execute(delete(_table).where(*conditions)).rowcount)


# --- Resubmitting (``workers.operations.dead_letters`` drives these) ------------------------------


def resubmittable(
    engine: Engine,
    *,
    tenant: str | None,
    task: str | None = None,
    reason: str | None = None,
    since: When | None = None,
    until: When | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """The dead letters not sent again yet that match, oldest first (the order they first
    failed in), without payloads: ``claim`` takes each one's payload as it marks it."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    statement = (
        select(*_SUMMARY)
        .where(*_conditions(tenant, task, reason, since, until, False))
        .order_by(_c.failed_at, _c.id)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [_shown(row) for row in conn.execute(statement)]


def claim(engine: Engine, job_id: str, token: str) -> dict[str, Any] | None:
    """Mark a dead letter as being sent again, with ``token`` standing in for the new job's id
    until ``settle_claim``; its task, payload and tenant, or None when it was sent again already
    (or is being: of two claims at once, one wins)."""
    statement = (
        update(_table)
        .where(_c.job_id == job_id, _c.resubmitted_at.is_(None))
        .values(resubmitted_at=func.now(), resubmitted_job_id=token)
        .returning(_c.job_id, _c.task, _c.payload, _c.tenant)
    )
    with engine.begin() as conn:
        row = conn.execute(statement).first()
    return None if row is None else dict(row._mapping)


def settle_claim(engine: Engine, job_id: str, token: str, new_job_id: str) -> None:
    """The claimed dead letter was sent again as ``new_job_id``."""
    statement = (
        update(_table)
        .where(_c.job_id == job_id, _c.resubmitted_job_id == token)
        .values(resubmitted_job_id=new_job_id)
    )
    with engine.begin() as conn:
        conn.execute(statement)


def release_claim(engine: Engine, job_id: str, token: str) -> None:
    """The claimed dead letter was not sent again: it is resubmittable as before."""
    statement = (
        update(_table)
        .where(_c.job_id == job_id, _c.resubmitted_job_id == token)
        .values(resubmitted_at=None, resubmitted_job_id=None)
    )
    with engine.begin() as conn:
        conn.execute(statement)


def _conditions(
    tenant: str | None,
    task: str | None,
    reason: str | None,
    since: When | None,
    until: When | None,
    resubmitted: bool | None,
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    for column, value in ((_c.tenant, tenant), (_c.task, task), (_c.reason, reason)):
        if value is not None:  # escaped as ``record`` stored it (and as Postgres takes text)
            conditions.append(column == storable_text(value))
    if since is not None:
        conditions.append(_c.failed_at >= _time(since))
    if until is not None:
        conditions.append(_c.failed_at < _time(until))
    if resubmitted is not None:
        is_resubmitted = _c.resubmitted_at.is_not(None)
        conditions.append(is_resubmitted if resubmitted else _c.resubmitted_at.is_(None))
    return conditions


def _time(when: When) -> datetime:
    if isinstance(when, str):
        return parse_time(when)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _shown(row: Any) -> dict[str, Any]:
    """A row as JSON-ready data: times as ``iso_ms`` writes them."""
    return {
        key: iso_ms(value) if isinstance(value, datetime) else value
        for key, value in row._mapping.items()
    }


__all__ = [
    "MAX_LIST",
    "When",
    "claim",
    "find",
    "flush_spill",
    "get_dead_letter",
    "json_text",
    "list_dead_letters",
    "purge_dead_letters",
    "record",
    "release_claim",
    "resubmittable",
    "settle_claim",
    "storable_json",
    "storable_row",
]
