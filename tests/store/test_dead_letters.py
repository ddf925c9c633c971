"""Dead letters in Postgres, through the plain functions: every row is stored, whatever it
carries (NaN, NUL, lone surrogates, nesting no encoder follows), losing nothing; a spill list
holding such rows (or garbage) moves fully; only an outage stops a flush. And the property
tying validation to storage: a value is refused at submit, or stored by both tables' paths."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import pytest
import sqlalchemy.exc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine

from conveyor import keys
from conveyor.errors import PayloadError
from conveyor.schemas import validate_payload
from conveyor.schemas.episodes import EpisodePayload
from conveyor.schemas.storable import MAX_DEPTH
from workers.store import dead_letters
from workers.store.dead_letters import find, flush_spill, json_text, record
from workers.store.episodes import episode_row, insert_episodes

MAX_BYTES = 256 * 1024
SPILL = keys.DEAD_LETTER_SPILL


def nested(levels: int, leaf: Any = 1, *, lists: bool = False) -> Any:
    value = leaf
    for _ in range(levels):
        value = [value] if lists else {"a": value}
    return value


def row(job_id: str, payload: Any, **fields: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "task": "episodes.record",
        "queue": "episodes",
        "payload": payload,
        "reason": "poison",
        "error": "invalid payload",
        "attempts": 1,
        **fields,
    }


def same(a: Any, b: Any) -> bool:
    """JSON equality as jsonb keeps it: numbers by value (1e16 comes back as an int)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b if isinstance(a, int) and isinstance(b, int) else float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.fixture
def down_engine():
    """An engine whose Postgres never answers: every insert is an outage."""
    eng = create_engine(
        "postgresql+psycopg2://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2}
    )
    yield eng
    eng.dispose()


UNSTORABLE = [
    pytest.param({"metadata": {"x": float("nan")}}, "metadata.x: must be a finite", id="nan"),
    pytest.param({"l": [1, float("inf"), -float("inf")]}, "l.1: must be a finite", id="inf"),
    pytest.param({"prompt": "a\x00b"}, "prompt: must not contain NUL", id="nul"),
    pytest.param({"k\x00": 1}, "key must not contain NUL", id="nul-key"),
    pytest.param({"prompt": "x\ud800y"}, "prompt: must be valid Unicode", id="surrogate"),
    pytest.param({"\udc80": [1]}, "key must be valid Unicode", id="surrogate-key"),
    pytest.param({"deep": nested(10_000)}, "nested deeper than", id="deep-dict"),
    pytest.param(nested(10_000, lists=True), "nested deeper than", id="deep-list"),
    pytest.param({"d": nested(MAX_DEPTH)}, "nested deeper than", id="just-too-deep"),
    pytest.param({"when": datetime(2026, 1, 2, tzinfo=UTC)}, "not datetime", id="datetime"),
    pytest.param(float("nan"), "payload: must be a finite", id="bare-nan"),
]


@pytest.mark.parametrize(("payload", "why"), UNSTORABLE)
def test_a_payload_postgres_refuses_is_stored_as_its_json_text(
    engine, redis_client, unique, payload, why
):
    job_id = f"dl-{unique}"
    assert record(engine, redis_client, row(job_id, payload)) is True
    stored = find(engine, job_id)
    assert stored is not None and stored["reason"] == "poison"
    kept = stored["payload"]
    assert set(kept) == {"unstorable_json", "why"} and why in kept["why"]
    assert kept["unstorable_json"] == json_text(payload)
    if len(kept["unstorable_json"]) < 1000:  # json.loads cannot follow the 10,000-deep ones
        # json.loads gives the original back (NaN, NUL and surrogates included).
        assert json_text(json.loads(kept["unstorable_json"])) == json_text(payload)


def test_the_json_text_of_a_deep_payload_gives_it_back():
    deep = {"deep": nested(10_000, leaf=["\x00", float("nan")])}
    text = json_text(deep)
    assert text == '{"deep":' + '{"a":' * 10_000 + '["\\u0000",NaN]' + "}" * 10_001
    looped: list[Any] = [1]
    looped.append(looped)
    assert json_text(looped) == '[1,"<circular reference>"]'


def test_text_columns_keep_nul_and_surrogates_escaped(engine, redis_client, unique):
    bad = row(
        f"dl-{unique}\x00",
        {"ok": True},
        task="episodes.record\ud800",
        error="Postgres refused the row: a\x00b \udcff",
        queue="q\x00",
    )
    assert record(engine, redis_client, bad) is True
    stored = find(engine, f"dl-{unique}\\u0000")
    assert stored is not None
    assert stored["task"] == "episodes.record\\ud800"
    assert stored["error"] == "Postgres refused the row: a\\u0000b \\udcff"
    assert stored["queue"] == "q\\u0000"
    assert stored["payload"] == {"ok": True}


def test_a_storable_payload_is_stored_as_it_is(engine, redis_client, unique):
    payload = {
        "big": 2**70,  # jsonb numbers are arbitrary precision: fine in a dead letter
        "literal": "the six characters \\u0000",
        "text": "émoji \U0001f600",
        "deep": nested(MAX_DEPTH - 2),
        "n": [1.5, -0.0, 1e300, None, True],
    }
    assert record(engine, redis_client, row(f"dl-{unique}", payload)) is True
    stored = find(engine, f"dl-{unique}")
    assert stored is not None and same(stored["payload"], payload)
    again = row(f"dl-{unique}", {"second": True}, error="redelivered")
    assert record(engine, redis_client, again) is True  # the first row stays
    assert same(find(engine, f"dl-{unique}")["payload"], payload)


def test_while_postgres_is_down_a_bad_row_is_spilled_and_then_moved(
    engine, down_engine, redis_client, unique
):
    before = datetime.now(UTC)
    bad = row(f"dl-{unique}", {"x": float("nan"), "s": "\ud800", "z": "\x00"}, error="e\x00")
    assert record(down_engine, redis_client, bad) is False
    spilled = json.loads(redis_client.lindex(SPILL, -1))
    assert spilled["job_id"] == f"dl-{unique}"
    assert datetime.fromisoformat(spilled["failed_at"]) >= before - timedelta(seconds=1)
    assert flush_spill(engine, redis_client) >= 1
    assert redis_client.llen(SPILL) == 0
    stored = find(engine, f"dl-{unique}")
    assert stored is not None and stored["error"] == "e\\u0000"
    assert stored["payload"]["unstorable_json"] == json_text(bad["payload"])
    # When it failed, not when the flush moved it.
    assert abs(stored["failed_at"] - datetime.fromisoformat(spilled["failed_at"])) < timedelta(
        seconds=1
    )


def test_an_outage_stops_the_flush_and_keeps_the_rows(engine, down_engine, redis_client, unique):
    redis_client.rpush(SPILL, json.dumps(row(f"dl-{unique}", {"n": 1})))
    length = redis_client.llen(SPILL)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        flush_spill(down_engine, redis_client)
    assert redis_client.llen(SPILL) == length
    assert flush_spill(engine, redis_client) >= 1
    assert find(engine, f"dl-{unique}")["payload"] == {"n": 1}


def test_a_spill_list_of_bad_rows_moves_fully(engine, redis_client, unique):
    def job(name: str) -> str:
        return f"dl-{unique}-{name}"

    deep_text = (
        json.dumps(row(job("deep"), None))[:-1] + ', "extra": ' + "[" * 10_000 + "]" * 10_000 + "}"
    )
    items: list[str | bytes] = [
        # As the spill wrote rows before the fix (json.dumps allows NaN; escapes surrogates).
        json.dumps(row(job("nan"), {"x": float("nan")}, error="a\x00b")),
        json.dumps(row(job("surrogate"), {"s": "\ud800"}, error="\udc80")),
        json.dumps(row(job("nul"), {"k\x00": "\x00"})),
        json.dumps(row(job("good-1"), {"fine": [1, 2]})),
        deep_text,  # more nesting than json.loads follows
        b"\xff\xfe not json at all",
        json.dumps(["a", "list"]),
        json.dumps({"job_id": job("bare")}),  # no task, reason or error
        json.dumps(row(job("colour"), {"n": 1}, colour="red")),  # no such column
        json.dumps(row(job("when"), {"n": 1}, failed_at="not a time")),
        json.dumps(row(job("attempts"), {"n": 1}, attempts=2**40)),  # over INTEGER
        json.dumps(row(job("good-2"), {"fine": True})),
        json.dumps(row(job("good-2"), {"fine": "a second time"})),  # a duplicate: kept once
    ]
    redis_client.rpush(SPILL, *items)
    length = redis_client.llen(SPILL)
    assert flush_spill(engine, redis_client, batch=4) == length  # most batches hold a bad row
    assert redis_client.llen(SPILL) == 0

    assert find(engine, job("good-1"))["payload"] == {"fine": [1, 2]}
    assert find(engine, job("good-2"))["payload"] == {"fine": True}
    nan = find(engine, job("nan"))
    assert nan["payload"]["unstorable_json"] == '{"x":NaN}' and nan["error"] == "a\\u0000b"
    surrogate = find(engine, job("surrogate"))
    assert surrogate["error"] == "\\udc80"
    assert surrogate["payload"]["unstorable_json"] == '{"s":"\\ud800"}'
    assert find(engine, job("nul"))["payload"]["unstorable_json"] == '{"k\\u0000":"\\u0000"}'
    for raw in (deep_text.encode(), b"\xff\xfe not json at all", b'["a", "list"]'):
        unreadable = find(engine, "spill-" + hashlib.sha256(raw).hexdigest()[:32])
        assert unreadable is not None and unreadable["reason"] == "unreadable"
    deep = find(engine, "spill-" + hashlib.sha256(deep_text.encode()).hexdigest()[:32])
    assert deep["payload"]["unstorable_json"] == deep_text  # nothing lost
    bare = find(engine, job("bare"))
    assert (bare["task"], bare["reason"]) == ("unknown", "unknown")
    assert "Postgres refused the row" in bare["payload"]["why"]
    colour = find(engine, job("colour"))
    assert colour["task"] == "episodes.record" and '"colour":"red"' in colour["payload"]["row"]
    when = find(engine, job("when"))
    assert '"failed_at":"not a time"' in when["payload"]["row"]
    attempts = find(engine, job("attempts"))
    assert attempts["attempts"] == 2**31 - 1 and str(2**40) in attempts["payload"]["row"]


def test_a_row_that_is_not_json_cannot_block_record(engine, redis_client, unique):
    """Python values from a raw message (kombu decodes datetimes, UUIDs) go in as text."""
    odd = row(f"dl-{unique}", {"id": uuid.UUID(int=7), "at": {1, 2}}, attempts=10**12)
    assert record(engine, redis_client, odd) is True
    stored = find(engine, f"dl-{unique}")
    assert stored["payload"]["unstorable_json"].startswith('{"id":"00000000-0000-0000-0000')
    # attempts overflowed INTEGER: the bare row keeps everything else, and why.
    assert stored["attempts"] == 2**31 - 1
    assert "must be a JSON value, not UUID" in stored["payload"]["why"]
    assert "Postgres refused the row" in stored["payload"]["why"]


# --- The property: refused at submit, or stored by every path -------------------------------------

_text = st.text(
    st.characters(exclude_categories=())  # surrogates included
    | st.sampled_from(["\x00", "\ud800", "\udfff", "\\", "é", "\U0001f600"]),
    max_size=8,
) | st.sampled_from(["\\u0000", "a\\u0000\x00"])  # the text "\u0000", not a NUL
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**31])
    | st.floats()  # NaN and ±Infinity included
    | _text
)
# Mostly plain keys (one bad key refuses the whole value); one in ten a bad one.
_keys = st.builds(
    lambda n, plain, bad: bad if n == 0 else plain,
    st.integers(0, 9),
    st.text(max_size=6),
    st.sampled_from(["k\x00", "\udc80", "\\u0000"]),
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=24,
)
_deep = st.builds(nested, st.integers(MAX_DEPTH - 6, MAX_DEPTH + 4), _values, lists=st.booleans())
_metadata = st.dictionaries(_keys, _values, max_size=4) | st.dictionaries(_keys, _deep, max_size=2)


@pytest.fixture(scope="module")
def pg(database_url):
    """An autocommit psycopg2 connection, as the episodes pool writes through."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    yield conn
    conn.close()


@settings(
    max_examples=100,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the project
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(metadata=_metadata)
def test_any_value_is_refused_at_submit_or_stored_by_every_path(engine, redis_client, pg, metadata):
    payload = {"user_id": "u", "model_type": "m", "metadata": metadata}
    job_id = f"prop-{uuid.uuid4().hex}"
    try:
        model = validate_payload("episodes.record", payload, max_bytes=MAX_BYTES)
    except PayloadError as exc:
        accepted = False
        event(f"refused: {exc.problems[0].split(': ', 1)[-1][:40]}")
    else:
        accepted = True
        event("accepted")
        assert isinstance(model, EpisodePayload)
        episode = episode_row(model, episode_id=job_id)
        result = insert_episodes(pg, [episode])
        assert (result.inserted, result.rejected) == ([0], {}), result.rejected
        with pg.cursor() as cur:
            cur.execute("SELECT metadata FROM episodic_logs WHERE episode_id = %s", (job_id,))
            [(stored_metadata,)] = cur.fetchall()
        assert same(stored_metadata, metadata)
    # Accepted or not, its dead letter is stored: as it is, or as its JSON text.
    assert record(engine, redis_client, row(job_id, payload)) is True
    kept = find(engine, job_id)["payload"]
    if accepted or set(kept) != {"unstorable_json", "why"}:
        assert same(kept, payload)
    else:
        assert kept["unstorable_json"] == json_text(payload)


def test_storable_row_is_what_record_writes():
    safe = dead_letters.storable_row(row("j\x00", {"x": math.inf}))
    assert safe["job_id"] == "j\\u0000" and safe["payload"]["unstorable_json"] == '{"x":Infinity}'
