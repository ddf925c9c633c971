"""Episodes in Postgres, through the plain functions: batched idempotent writes, a bad row
isolated, queries, search, cursor pages, recall and retention; and the schema's refusals."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from conveyor import PayloadError
from conveyor.schemas.episodes import EpisodePayload
from workers.store.episodes import (
    BadCursor,
    delete_older_than,
    episode_row,
    insert_episodes,
    iter_episodes,
    parse_time,
    query_episodes,
    recent_episodes,
)

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def conn(engine):
    """A psycopg2 connection in autocommit mode, as the episodes pool uses it."""
    raw = engine.raw_connection()
    raw.driver_connection.autocommit = True
    yield raw.driver_connection
    raw.close()


def _row(episode_id: str, **fields):
    payload = EpisodePayload.model_validate(
        {"user_id": "u", "model_type": "m", "prompt": "p", "response": "r", **fields}
    )
    return episode_row(payload, episode_id=episode_id)


def _write(conn, rows):
    result = insert_episodes(conn, rows)
    assert not result.rejected
    return result


def test_a_batch_is_one_statement_and_a_second_write_is_a_no_op(conn, engine, unique):
    rows = [_row(f"{unique}-{i}", session_id=unique) for i in range(300)]
    first = insert_episodes(conn, rows)
    assert (len(first.inserted), first.duplicates, first.statements) == (300, [], 1)
    again = insert_episodes(conn, [*rows[:10], _row(f"{unique}-new", session_id=unique)])
    assert (again.inserted, again.duplicates) == ([10], list(range(10)))
    with engine.connect() as c:
        count, batches = c.execute(
            text(
                "SELECT count(*), count(DISTINCT created_at) FROM episodic_logs"
                " WHERE session_id = :s"
            ),
            {"s": unique},
        ).one()
    assert (count, batches) == (301, 2)  # one statement, one transaction, one created_at each


def test_a_row_postgres_refuses_is_isolated_and_the_rest_is_written(conn, engine, unique):
    rows = [_row(f"{unique}-{i}", session_id=unique) for i in range(20)]
    # Past the schema (which refuses both): a NUL in text fails in psycopg2, a \u0000 in jsonb
    # fails in Postgres.
    rows[3] = (*rows[3][:5], "bad\x00prompt", *rows[3][6:])
    rows[17] = (*rows[17][:14], json.dumps({"k": "\u0000"}), *rows[17][15:])
    result = insert_episodes(conn, rows)
    assert sorted(result.rejected) == [3, 17]
    assert "NUL" in result.rejected[3]
    assert "DataError" in result.rejected[17] or "Untranslatable" in result.rejected[17]
    assert len(result.inserted) == 18
    assert result.statements > 1
    page = query_episodes(engine, session_id=unique, limit=100)
    assert len(page.episodes) == 18


def test_the_same_id_twice_in_one_batch_is_written_once(conn, unique):
    row = _row(f"{unique}-x")
    result = insert_episodes(conn, [row, row])
    assert (result.inserted, result.duplicates) == ([0], [1])


@pytest.fixture
def history(conn, unique):
    """Twelve episodes a minute apart: two users, two sessions, two models, one error."""
    rows = []
    for i in range(12):
        rows.append(
            _row(
                f"{unique}-{i:02d}",
                timestamp=NOW - timedelta(minutes=12 - i),
                user_id=f"{unique}-u{i % 2}",
                session_id=f"{unique}-s{i // 6}",
                model_type="gpt" if i < 8 else "llama",
                prompt=f"question {i} about {'bananas' if i % 3 == 0 else 'apples'}",
                response=f"answer {i}" + (" with a quokka" if i == 7 else ""),
                status="error" if i == 5 else "success",
                tokens={"prompt": 3, "completion": 2},
                metadata={"i": i},
            )
        )
    _write(conn, rows)
    return unique


def _ids(episodes):
    return [int(e["episode_id"].rsplit("-", 1)[1]) for e in episodes]


def test_query_filters_newest_first(engine, history):
    u = history
    assert _ids(query_episodes(engine, user_id=f"{u}-u1").episodes) == [11, 9, 7, 5, 3, 1]
    assert _ids(query_episodes(engine, session_id=f"{u}-s1").episodes) == [11, 10, 9, 8, 7, 6]
    both = query_episodes(engine, session_id=f"{u}-s0", model_type="gpt", status="error")
    assert _ids(both.episodes) == [5]
    window = query_episodes(
        engine,
        session_id=f"{u}-s1",
        since=NOW - timedelta(minutes=5),
        until=NOW - timedelta(minutes=2),
    )
    assert _ids(window.episodes) == [9, 8, 7]  # since inclusive, until exclusive
    episode = query_episodes(engine, user_id=f"{u}-u0", limit=1).episodes[0]
    assert episode["tokens"] == {"prompt": 3, "completion": 2, "total": 5, "estimated": False}
    assert episode["metadata"] == {"i": 10} and episode["timestamp"].endswith("Z")
    EpisodePayload.model_validate({k: v for k, v in episode.items() if k != "created_at"})


def test_full_text_search_over_prompt_and_response(engine, history):
    u = history
    bananas = query_episodes(engine, user_id=f"{u}-u0", search="bananas")
    assert _ids(bananas.episodes) == [6, 0]
    assert _ids(query_episodes(engine, session_id=f"{u}-s1", search="quokka").episodes) == [7]
    phrase = query_episodes(engine, session_id=f"{u}-s1", search='"about apples" -answer')
    assert phrase.episodes == []
    either = query_episodes(engine, session_id=f"{u}-s0", search="bananas or quokka")
    assert _ids(either.episodes) == [3, 0]


def test_cursor_pages_cover_everything_once(engine, history):
    u = history
    seen, cursor, pages = [], None, 0
    while True:
        page = query_episodes(engine, session_id=f"{u}-s0", limit=4, cursor=cursor)
        seen += _ids(page.episodes)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert (seen, pages) == ([5, 4, 3, 2, 1, 0], 2)
    assert _ids(iter_episodes(engine, session_id=f"{u}-s1", limit=2)) == [11, 10, 9, 8, 7, 6]
    with pytest.raises(BadCursor):
        query_episodes(engine, cursor="not-a-cursor")


def test_cli_prints_json_lines_and_the_next_cursor(history, capsys):
    from workers.cli import main

    u = history
    args = ["episodes", "--session", f"{u}-s1", "--limit", "4"]
    first = subprocess.run(  # once for real: the command and its imports
        [sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, check=True
    )
    assert _ids(json.loads(line) for line in first.stdout.splitlines()) == [11, 10, 9, 8]
    cursor = json.loads(first.stderr.strip().splitlines()[-1])["next_cursor"]
    assert main([*args, "--cursor", cursor]) == 0
    rest = capsys.readouterr()
    assert _ids(json.loads(line) for line in rest.out.splitlines()) == [7, 6]
    assert "next_cursor" not in rest.err
    assert main([*args, "--all", "--search", "bananas"]) == 0
    assert _ids(json.loads(line) for line in capsys.readouterr().out.splitlines()) == [9, 6]
    assert main([*args, "--since", "yesterday"]) == 2
    assert "not a time" in capsys.readouterr().err


def test_recent_episodes_within_a_token_budget(engine, history):
    session = f"{history}-s0"  # episodes 0-5, 5 is an error; each costs about 5+3 tokens
    recall = functools.partial(recent_episodes, engine, session, count_tokens=len)
    assert _ids(recall(3, 10_000)) == [2, 3, 4]  # oldest first
    assert _ids(recall(3, 10_000, status=None)) == [3, 4, 5]
    costs = [
        len(e["prompt"]) // 4 + len(e["response"]) // 4
        for e in recent_episodes(engine, session, 10, 10_000, count_tokens=lambda s: len(s) // 4)
    ]
    budget = sum(costs[-2:])  # room for the last two only
    recalled = recent_episodes(engine, session, 10, budget, count_tokens=lambda s: len(s) // 4)
    assert _ids(recalled) == [3, 4]
    assert recall(0, 1000) == []
    assert recall(5, 1) == []  # the newest alone does not fit


def test_retention_deletes_old_episodes_in_chunks(conn, engine, unique):
    old = [
        _row(f"{unique}-old-{i}", session_id=unique, timestamp=NOW - timedelta(days=400))
        for i in range(20)
    ]
    new = [_row(f"{unique}-new-{i}", session_id=unique, timestamp=NOW) for i in range(3)]
    _write(conn, old + new)
    result = delete_older_than(engine, days=365, chunk=7)
    assert result.deleted >= 20 and result.chunks >= 3 and result.finished
    left = query_episodes(engine, session_id=unique).episodes
    assert sorted(e["episode_id"] for e in left) == [f"{unique}-new-{i}" for i in range(3)]
    assert delete_older_than(engine, days=365, chunk=7).deleted == 0


def test_parse_time_takes_iso_or_an_age():
    assert parse_time("2026-11-20T10:00:00Z") == datetime(2026, 11, 20, 10, tzinfo=UTC)
    assert parse_time("2026-11-20T10:00:00") == datetime(2026, 11, 20, 10, tzinfo=UTC)
    assert parse_time("7d", now=NOW) == NOW - timedelta(days=7)
    assert parse_time("90s", now=NOW) == NOW - timedelta(seconds=90)
    with pytest.raises(ValueError, match="not a time"):
        parse_time("last tuesday")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"model_type": "m"}, "user_id: Field required"),
        ({"user_id": "u", "model_type": "m", "tokens": {"prompt": -1}}, "tokens.prompt"),
        ({"user_id": "u", "model_type": "m", "prompt": "a\x00b"}, "prompt: Value error, must not"),
        ({"user_id": "u", "model_type": "m", "metadata": {"k": "\x00"}}, "metadata: Value error"),
        ({"user_id": "u", "model_type": "m", "prompt": "x" * 300_000}, "over the limit of"),
        ({"user_id": "u", "model_type": ""}, "model_type"),
    ],
)
def test_bad_records_are_refused_at_submit_with_a_clear_error(submitter, payload, problem):
    with pytest.raises(PayloadError) as caught:
        submitter.validate("episodes.record", payload)
    assert problem in str(caught.value)


def test_recalled_history_is_the_tenants_own(conn, engine, unique):
    """Two tenants (and a service of none) use the same session id: each recalls only its
    own conversation, never another's."""
    session = f"{unique}-shared"
    rows = []
    for n, tenant in enumerate(("acme", "globex", None)):
        payload = EpisodePayload.model_validate(
            {"user_id": "u", "model_type": "m", "session_id": session, "prompt": f"p-{tenant}"}
        )
        rows.append(episode_row(payload, episode_id=f"{unique}-{n}", tenant=tenant))
    _write(conn, rows)
    for tenant in ("acme", "globex", None):
        recalled = recent_episodes(engine, session, 10, 10_000, count_tokens=len, tenant=tenant)
        assert [e["prompt"] for e in recalled] == [f"p-{tenant}"]
