"""Dead letters as people read them: filters newest first, a tenant that sees only its own
rows, a purge that takes only what failed before its time and only its tenant's; the tenant
and correlation columns kept on every path a row takes (spill, bare row); and migration 0002,
up and down, against the models."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from conveyor import keys
from tests.support.servers import _create_database, _drop_database
from workers.store.db import sqlalchemy_url
from workers.store.dead_letters import (
    find,
    flush_spill,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    record,
)
from workers.store.migrate import alembic_config, upgrade
from workers.store.models import metadata

NOW = datetime.now(UTC).replace(microsecond=0)
LISTED = {
    "job_id",
    "task",
    "queue",
    "reason",
    "error",
    "attempts",
    "failed_at",
    "resubmitted_at",
    "resubmitted_job_id",
    "tenant",
    "request_id",
    "traceparent",
}


def dead(job_id: str, task: str, *, hours_ago: float, **fields: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "task": task,
        "queue": "maintenance",
        "payload": {"message": job_id},
        "reason": "exhausted",
        "error": "gave up after 3 attempts: boom",
        "attempts": 3,
        "failed_at": NOW - timedelta(hours=hours_ago),
        **fields,
    }


@pytest.fixture
def letters(engine, redis_client, unique):
    """Two tenants' dead letters and a tenantless one, of a task name only this test uses."""
    task = f"test.{unique}"
    a, b = f"acme-{unique}", f"globex-{unique}"
    rows = [
        dead(f"a1-{unique}", task, hours_ago=1, tenant=a, request_id="req-1", traceparent="00-t"),
        dead(f"a2-{unique}", task, hours_ago=5, tenant=a, reason="poison"),
        dead(f"a3-{unique}", task, hours_ago=30, tenant=a),
        dead(f"b1-{unique}", task, hours_ago=2, tenant=b),
        dead(f"b2-{unique}", task, hours_ago=40, tenant=b),
        dead(f"n1-{unique}", task, hours_ago=3),
        dead(
            f"r1-{unique}",
            task,
            hours_ago=4,
            tenant=a,
            resubmitted_at=NOW,
            resubmitted_job_id=f"new-{unique}",
        ),
    ]
    for row in rows:
        assert record(engine, redis_client, row) is True
    return {"task": task, "a": a, "b": b, "unique": unique}


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["job_id"].split("-")[0] for row in rows]


def test_listing_is_newest_first_and_json_ready_without_payloads(engine, letters):
    rows = list_dead_letters(engine, tenant=None, task=letters["task"])
    assert ids(rows) == ["a1", "b1", "n1", "r1", "a2", "a3", "b2"]
    first = rows[0]
    assert set(first) == LISTED  # the payload only in get_dead_letter
    assert first["tenant"] == letters["a"]
    assert (first["request_id"], first["traceparent"]) == ("req-1", "00-t")
    assert first["failed_at"] == (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert rows[3]["resubmitted_at"].endswith("Z") and first["resubmitted_at"] is None
    json.dumps(rows)  # JSON-ready as they are


def test_filters(engine, letters):
    task, a = letters["task"], letters["a"]

    def listed(**filters: Any) -> list[str]:
        return ids(list_dead_letters(engine, **{"task": task, **filters}))

    assert listed(tenant=a, reason="poison") == ["a2"]
    assert listed(tenant=None, since="6h") == ["a1", "b1", "n1", "r1", "a2"]
    assert listed(tenant=None, since="6h", until="150m") == ["n1", "r1", "a2"]
    until = (NOW - timedelta(hours=30)).isoformat()
    assert listed(tenant=None, until=until) == ["b2"]  # until is exclusive
    since, until = NOW - timedelta(hours=30), NOW - timedelta(hours=4)
    assert listed(tenant=None, since=since, until=until) == ["a2", "a3"]  # since is inclusive
    assert listed(tenant=a, resubmitted=True) == ["r1"]
    assert listed(tenant=a, resubmitted=False) == ["a1", "a2", "a3"]
    assert listed(tenant=None, limit=2) == ["a1", "b1"]
    assert listed(tenant=None, task=f"other.{letters['unique']}") == []


def test_a_tenant_sees_only_its_own_dead_letters(engine, letters):
    task, a, b, unique = letters["task"], letters["a"], letters["b"], letters["unique"]
    assert ids(list_dead_letters(engine, tenant=a, task=task)) == ["a1", "r1", "a2", "a3"]
    assert ids(list_dead_letters(engine, tenant=b, task=task)) == ["b1", "b2"]
    # Another tenant's row, a tenantless row and a row that does not exist look alike.
    assert get_dead_letter(engine, f"b1-{unique}", tenant=a) is None
    assert get_dead_letter(engine, f"n1-{unique}", tenant=a) is None
    assert get_dead_letter(engine, f"zz-{unique}", tenant=a) is None
    own = get_dead_letter(engine, f"a1-{unique}", tenant=a)
    assert own is not None and own["payload"] == {"message": f"a1-{unique}"}
    assert set(own) == LISTED | {"payload"}
    operator = get_dead_letter(engine, f"n1-{unique}", tenant=None)
    assert operator is not None and operator["tenant"] is None


def test_purge_takes_only_what_failed_before_and_only_the_tenants(engine, letters):
    task, a, b = letters["task"], letters["a"], letters["b"]
    before = NOW - timedelta(hours=4, minutes=30)  # a2, a3 of acme; b2 of globex
    assert purge_dead_letters(engine, before=before, tenant=a, dry_run=True) == 2
    assert ids(list_dead_letters(engine, tenant=a, task=task)) == ["a1", "r1", "a2", "a3"]
    assert purge_dead_letters(engine, before=before, tenant=a) == 2
    assert ids(list_dead_letters(engine, tenant=None, task=task)) == ["a1", "b1", "n1", "r1", "b2"]
    assert purge_dead_letters(engine, before=before, tenant=a) == 0
    assert purge_dead_letters(engine, before="210m", tenant=b) == 1
    assert ids(list_dead_letters(engine, tenant=b, task=task)) == ["b1"]


def test_the_operators_purge_takes_every_tenants(engine, redis_client, unique):
    task = f"test.{unique}"
    long_ago = datetime(2001, 1, 1, tzinfo=UTC)
    for n, tenant in enumerate(("x", "y", None)):
        row = dead(f"old{n}-{unique}", task, hours_ago=0, tenant=tenant, failed_at=long_ago)
        record(engine, redis_client, row)
    assert purge_dead_letters(engine, before=long_ago + timedelta(seconds=1), tenant=None) == 3
    assert list_dead_letters(engine, tenant=None, task=task) == []


def test_ids_and_filters_are_matched_as_record_stored_them(engine, redis_client, unique):
    """NUL and lone surrogates are kept escaped; looking them up neither fails nor misses."""
    job_id, tenant = f"nul\x00-{unique}", f"acme\udc80-{unique}"
    record(engine, redis_client, dead(job_id, f"test.{unique}\x00", hours_ago=0, tenant=tenant))
    found = get_dead_letter(engine, job_id, tenant=tenant)
    assert found is not None and found["job_id"] == f"nul\\u0000-{unique}"
    assert ids(list_dead_letters(engine, tenant=tenant, task=f"test.{unique}\x00")) == [
        "nul\\u0000"
    ]
    assert list_dead_letters(engine, tenant=None, reason="\ud800") == []


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda e: list_dead_letters(e, tenant=None, limit=0), "limit must be from 1 to 1000"),
        (lambda e: list_dead_letters(e, tenant=None, limit=1001), "limit must be from 1 to 1000"),
        (lambda e: list_dead_letters(e, tenant=None, since="yesterday"), "not a time"),
        (lambda e: purge_dead_letters(e, before="soon", tenant=None), "not a time"),
    ],
)
def test_what_cannot_be_used_is_a_value_error(engine, call, expected):
    with pytest.raises(ValueError, match=expected):
        call(engine)


def test_tenant_and_correlation_survive_the_spill_and_a_bare_row(engine, redis_client, unique):
    origin = {"tenant": f"acme-{unique}", "request_id": "req\x00-9", "traceparent": "00-abc-01"}
    down = create_engine(
        "postgresql+psycopg2://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2}
    )
    try:
        spilled = dead(f"spill-{unique}", "maintenance.ping", hours_ago=0, **origin)
        del spilled["failed_at"]
        assert record(down, redis_client, spilled) is False
    finally:
        down.dispose()
    assert json.loads(redis_client.lindex(keys.DEAD_LETTER_SPILL, -1))["tenant"] == origin["tenant"]
    assert flush_spill(engine, redis_client) >= 1
    moved = find(engine, f"spill-{unique}")
    assert moved is not None
    assert (moved["tenant"], moved["request_id"], moved["traceparent"]) == (
        origin["tenant"],
        "req\\u0000-9",  # escaped like every text column
        "00-abc-01",
    )

    # attempts beyond INTEGER: Postgres refuses the row, which is stored bare, still the tenant's.
    refused = dead(f"bare-{unique}", "maintenance.ping", hours_ago=0, attempts=2**40, **origin)
    assert record(engine, redis_client, refused) is True
    bare = get_dead_letter(engine, f"bare-{unique}", tenant=origin["tenant"])
    assert bare is not None and "Postgres refused the row" in bare["payload"]["why"]
    assert (bare["request_id"], bare["traceparent"]) == ("req\\u0000-9", "00-abc-01")


@pytest.fixture
def fresh_database(database_url, unique):
    """A database of this test's own, for migrating up and down."""
    name = f"conveyor_migrate_{unique}"
    url = _create_database(database_url, name)
    yield url
    _drop_database(database_url, name)


def test_migration_0002_matches_the_models_and_goes_down_and_up_again(fresh_database):
    from alembic import command

    db = create_engine(sqlalchemy_url(fresh_database))
    try:
        upgrade(fresh_database)
        with db.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert _tenant_columns(db) == {
            "episodic_logs": {"tenant"},
            "dead_letters": {"tenant", "request_id", "traceparent"},
            "workflow_executions": {"tenant"},
        }
        command.downgrade(alembic_config(fresh_database), "0001")
        assert _tenant_columns(db) == {
            "episodic_logs": set(),
            "dead_letters": set(),
            "workflow_executions": set(),
        }
        assert "ix_dead_letters_tenant_failed" not in _indexes(db, "dead_letters")
        upgrade(fresh_database)
        assert "ix_dead_letters_tenant_failed" in _indexes(db, "dead_letters")
        assert "ix_episodic_logs_tenant_time" in _indexes(db, "episodic_logs")
    finally:
        db.dispose()


def _tenant_columns(db: Any) -> dict[str, set[str]]:
    wanted = {"tenant", "request_id", "traceparent"}
    inspector = inspect(db)
    return {
        table: {c["name"] for c in inspector.get_columns(table)} & wanted
        for table in ("episodic_logs", "dead_letters", "workflow_executions")
    }


def _indexes(db: Any, table: str) -> set[str]:
    return {index["name"] for index in inspect(db).get_indexes(table)}
