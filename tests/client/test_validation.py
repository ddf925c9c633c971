"""Validation refuses what a worker or Postgres would refuse, naming the field: NaN and
Infinity, NUL, lone surrogates, numbers no column or decoder holds, nesting past the limit
(however deep: never a RecursionError). The library and the CLI give the same verdict."""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor import PayloadError
from conveyor.names import QUEUES
from conveyor.schemas import validate_payload
from conveyor.schemas.storable import INT32_MAX, MAX_DEPTH, compact_size, json_problems
from tests.client.test_submit import _cli
from tests.support.queues import messages, purge

EPISODE = {"user_id": "u", "model_type": "m"}
MAX_BYTES = 256 * 1024


def nested(levels: int, leaf: Any = 1, *, key: str | None = "a") -> Any:
    """``levels`` containers around ``leaf``: dicts under ``key``, or lists when key is None."""
    value = leaf
    for _ in range(levels):
        value = [value] if key is None else {key: value}
    return value


def episode(**fields: Any) -> dict[str, Any]:
    return {**EPISODE, **fields}


@pytest.fixture(autouse=True)
def empty_queues(redis_client):
    purge(redis_client, *QUEUES)
    yield
    purge(redis_client, *QUEUES)


BAD = [
    # (task, payload, the field the error must name)
    pytest.param("episodes.record", episode(metadata={"x": float("nan")}), "metadata.x", id="nan"),
    pytest.param(
        "episodes.record", episode(metadata={"x": [1, float("inf")]}), "metadata.x.1", id="inf"
    ),
    pytest.param("episodes.record", episode(latency_ms=float("-inf")), "latency_ms", id="-inf"),
    pytest.param("episodes.record", episode(latency_ms="NaN"), "latency_ms", id="nan-string"),
    pytest.param("ai.generate", {"prompt": "p", "temperature": float("nan")}, "temperature"),
    pytest.param("episodes.record", episode(user_id="u\x00"), "user_id", id="nul-in-id"),
    pytest.param("episodes.record", episode(episode_id="e\x00"), "episode_id", id="nul-in-id2"),
    pytest.param(
        "ai.chat", {"messages": [{"role": "user", "content": "a\x00"}]}, "messages.0.content"
    ),
    pytest.param("ai.generate", {"prompt": "p", "session_id": "s\x00"}, "session_id", id="nul-ai"),
    pytest.param(
        "n8n.execute", {"workflow": "w", "data": {"k": ["ok", "\x00"]}}, "data.k.1", id="nul-n8n"
    ),
    pytest.param("n8n.execute", {"workflow": "w", "data": {"k\x00": 1}}, "data.", id="nul-key"),
    pytest.param("episodes.record", episode(prompt="\ud800"), "prompt", id="surrogate"),
    pytest.param(
        "episodes.record", episode(metadata={"k": ["\udc80x"]}), "metadata.k.0", id="surrogate2"
    ),
    pytest.param("n8n.execute", {"workflow": "w", "data": {"\udfff": 1}}, "data.", id="sur-key"),
    pytest.param("episodes.record", episode(tokens={"prompt": 1e30}), "tokens.prompt", id="1e30"),
    pytest.param(
        "episodes.record", episode(tokens={"completion": INT32_MAX + 1}), "tokens.completion"
    ),
    pytest.param(
        "episodes.record",
        episode(tokens={"prompt": INT32_MAX, "completion": 1}),
        "tokens: Value error, prompt + completion",
        id="total-overflows",
    ),
    pytest.param("episodes.record", episode(metadata={"n": 2**63}), "metadata.n", id="int64"),
    pytest.param("n8n.execute", {"workflow": "w", "data": {"n": -(2**63) - 1}}, "data.n"),
    pytest.param("episodes.record", episode(metadata=nested(MAX_DEPTH)), "metadata.a", id="65"),
    pytest.param("episodes.record", episode(metadata=nested(987)), "metadata.a", id="988"),
    pytest.param("episodes.record", episode(metadata=nested(10_000)), "metadata.a", id="10001"),
    pytest.param(
        "n8n.execute", {"workflow": "w", "data": {"l": nested(10_000, key=None)}}, "data.l.0.0"
    ),
]


@pytest.mark.parametrize(("task", "payload", "field"), BAD)
def test_what_workers_or_postgres_refuse_is_refused_at_submit_naming_the_field(
    submitter, redis_client, task, payload, field
):
    with pytest.raises(PayloadError) as caught:
        submitter.submit(task, payload)
    assert field in str(caught.value)
    assert all(messages(redis_client, q) == [] for q in QUEUES)
    # Workers run the same function on receipt: a raw message gets the same verdict.
    with pytest.raises(PayloadError) as again:
        validate_payload(task, payload, max_bytes=MAX_BYTES)
    assert again.value.problems == caught.value.problems


def test_nesting_up_to_the_limit_is_accepted_and_one_more_level_is_not():
    # The payload object is level 1 and metadata level 2: nested(n) makes metadata n levels.
    validate_payload(
        "episodes.record", episode(metadata=nested(MAX_DEPTH - 1)), max_bytes=MAX_BYTES
    )
    lists = episode(metadata={"l": nested(MAX_DEPTH - 2, key=None)})  # [] is a level too
    validate_payload("episodes.record", lists, max_bytes=MAX_BYTES)
    with pytest.raises(PayloadError, match=f"nested deeper than {MAX_DEPTH} levels"):
        validate_payload(
            "episodes.record", episode(metadata=nested(MAX_DEPTH)), max_bytes=MAX_BYTES
        )
    lists = episode(metadata={"l": nested(MAX_DEPTH - 1, key=None)})
    with pytest.raises(PayloadError, match=r"metadata\.l\.0\.0\.0\.0\.\.\.: nested deeper"):
        validate_payload("episodes.record", lists, max_bytes=MAX_BYTES)


def _with_little_stack_left(fn: Any, frames: int = 60) -> Any:
    """``fn()`` called with only about ``frames`` frames left before RecursionError."""

    def down(n: int) -> Any:
        return fn() if n <= 0 else down(n - 1)

    here = len(inspect.stack(0))
    return down(sys.getrecursionlimit() - here - frames)


def test_a_very_deep_document_is_a_payload_error_even_with_little_stack_left():
    def check() -> str:
        try:
            validate_payload("episodes.record", episode(metadata=nested(100_000)), max_bytes=10**9)
        except PayloadError as exc:
            return str(exc)
        return "accepted"

    assert "metadata.a.a.a.a.a...: nested deeper than 64 levels" in _with_little_stack_left(check)


def test_every_problem_is_named_with_the_schemas_own_errors():
    payload = {
        "model_type": "m",
        "metadata": {"a": float("nan"), "b": {"c": "\x00"}, "d": 2**64},
        "prompt": "\x00",
    }
    with pytest.raises(PayloadError) as caught:
        validate_payload("episodes.record", payload, max_bytes=MAX_BYTES)
    text = str(caught.value)
    assert "user_id: Field required" in text
    assert "prompt: Value error, must not contain NUL" in text
    assert "metadata: Value error, must not contain NUL" in text  # the schema's own check
    assert "metadata.b.c: must not contain NUL" in text  # and where it is
    assert "metadata.a: must be a finite number, not NaN" in text
    assert "metadata.d: must be an integer from" in text
    assert text.count("prompt:") == 1  # refused by the schema and the walk: named once


def test_keys_that_would_garble_the_message_are_shown_escaped():
    with pytest.raises(PayloadError) as caught:
        validate_payload(
            "n8n.execute", {"workflow": "w", "data": {"a\nb\x00": 1}}, max_bytes=MAX_BYTES
        )
    assert 'data."a\\nb\\u0000": key must not contain NUL' in str(caught.value)
    assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        "text with \\u0000 written out",  # the six characters, not a NUL
        "emoji \U0001f600 and accents é",
        2**63 - 1,
        -(2**63),
        1.7976931348623157e308,
        5e-324,
        -0.0,
        {"": None, "k": [True, False, None, 0, ""]},
    ],
)
def test_good_values_pass(value):
    validate_payload("episodes.record", episode(metadata={"v": value}), max_bytes=MAX_BYTES)
    validate_payload("n8n.execute", {"workflow": "w", "data": {"v": value}}, max_bytes=MAX_BYTES)


def test_python_values_json_cannot_hold_are_named():
    from datetime import datetime

    with pytest.raises(PayloadError, match=r"metadata\.when: must be a JSON value, not datetime"):
        validate_payload(
            "episodes.record", episode(metadata={"when": datetime.now()}), max_bytes=MAX_BYTES
        )
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(PayloadError, match="nested deeper than"):
        validate_payload(
            "n8n.execute", {"workflow": "w", "data": {"l": looped}}, max_bytes=MAX_BYTES
        )


def test_the_walk_stops_at_the_limit_of_problems():
    problems = json_problems({"x": [float("nan")] * 10_000}, limit=10)
    assert len(problems) == 10 and problems[0].path == ("x", 0)


_text = st.text(
    st.characters(exclude_categories=())  # surrogates included
    | st.sampled_from(["\x00", "\ud800", "\\", "u", "0", "9", "[", "{", "é"]),
    max_size=24,
) | st.sampled_from(["\\u0000", "1234567890123456789", "[[[[", "{" * 70])
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1])
    | st.floats()
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=30,
)
_any = _values | st.builds(nested, st.integers(MAX_DEPTH - 8, MAX_DEPTH + 2), _values, key=_text)


@settings(max_examples=500, deadline=None, database=None)
@given(value=_any)
def test_the_fast_screen_never_passes_what_the_walk_refuses(value):
    """validate_payload walks only what compact_size flags: the screen must be sound."""
    size, clean = compact_size(value)
    if clean:
        assert json_problems(value) == []
    if size is not None:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        assert size == len(text.encode("utf-8", "surrogatepass"))


CLI_BAD = [
    ('{"user_id": "u", "model_type": "m", "latency_ms": NaN}', "latency_ms"),
    ('{"user_id": "u", "model_type": "m", "metadata": {"x": -Infinity}}', "metadata.x"),
    ('{"user_id": "u\\u0000", "model_type": "m"}', "user_id"),
    ('{"user_id": "u", "model_type": "m", "prompt": "\\ud800"}', "prompt"),
    ('{"user_id": "u", "model_type": "m", "tokens": {"prompt": 1e30}}', "tokens.prompt"),
    ('{"user_id": "u", "model_type": "m", "metadata": {"n": 99999999999999999999}}', "metadata.n"),
    (
        '{"user_id": "u", "model_type": "m", "metadata": ' + '{"a": ' * 500 + "1" + "}" * 501,
        "metadata.a.a.a.a.a...: nested deeper than",
    ),
]


def test_cli_refuses_each_with_exit_2_and_one_line(redis_client):
    for data, field in CLI_BAD:
        result = _cli("episodes.record", "--data", "-", stdin=data)
        assert result.returncode == 2, (data[:80], result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("conveyor submit: invalid payload for episodes.record: ")
        assert field in line, line
    assert messages(redis_client, "episodes") == []


def test_cli_refuses_a_10000_deep_document_with_exit_2(redis_client):
    data = (
        '{"user_id": "u", "model_type": "m", "metadata": ' + '{"a": ' * 10_000 + "1" + "}" * 10_001
    )
    result = _cli("episodes.record", "--data", "-", stdin=data)
    assert "Traceback" not in result.stderr, result.stderr[-500:]
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
