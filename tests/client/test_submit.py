"""The submitter: validation before enqueue, routing by name, idempotency, batches, the CLI."""

import base64
import json
import os
import subprocess
import sys

import pytest

from conveyor import PayloadError, UnknownTaskError
from conveyor.errors import IdempotencyConflict
from conveyor.messages import PACK_HEADER
from conveyor.names import QUEUES, TASK_QUEUES
from tests.payloads import VALID
from tests.support.queues import messages, purge


@pytest.fixture(autouse=True)
def empty_queues(redis_client):
    purge(redis_client, *QUEUES)
    yield
    purge(redis_client, *QUEUES)


def test_each_task_lands_on_its_queue_as_json(submitter, redis_client):
    jobs = {name: submitter.submit(name, payload) for name, payload in VALID.items()}
    for name, job in jobs.items():
        queue = TASK_QUEUES[name]
        waiting = {m["headers"]["id"]: m for m in messages(redis_client, queue)}
        assert job.id in waiting, f"{name} not on queue {queue}"
        message = waiting[job.id]
        assert message["headers"]["task"] == name
        assert message["content-type"] == "application/json"
        for other in set(QUEUES) - {queue}:
            assert job.id not in {m["headers"]["id"] for m in messages(redis_client, other)}


def test_invalid_payload_is_refused_naming_the_field_and_nothing_is_enqueued(
    submitter, redis_client
):
    with pytest.raises(PayloadError) as caught:
        submitter.submit("ai.chat", {"messages": [{"role": "robot", "content": "hi"}], "tempo": 1})
    text = str(caught.value)
    assert "messages.0.role" in text
    assert "tempo: Extra inputs are not permitted" in text
    with pytest.raises(PayloadError, match="user_id: Field required"):
        submitter.submit("episodes.record", {"model_type": "x"})
    with pytest.raises(
        PayloadError, match=r"tokens\.prompt: Input should be greater than or equal to 0"
    ):
        submitter.submit(
            "episodes.record", {"user_id": "u", "model_type": "x", "tokens": {"prompt": -1}}
        )
    with pytest.raises(PayloadError, match="over the limit"):
        submitter.submit("ai.generate", {"prompt": "x" * 300_000})
    with pytest.raises(PayloadError, match="must be a JSON object"):
        submitter.submit("ai.generate", ["not", "an", "object"])
    assert all(messages(redis_client, q) == [] for q in QUEUES)


def test_workflow_and_provider_are_names_never_urls(submitter):
    with pytest.raises(PayloadError, match="workflow"):
        submitter.submit("n8n.execute", {"workflow": "http://evil.example/hook"})
    with pytest.raises(PayloadError, match="provider"):
        submitter.submit("ai.generate", {"prompt": "x", "provider": "https://evil.example/v1"})


def test_unknown_task_is_refused(submitter):
    with pytest.raises(
        UnknownTaskError, match=r"unknown task 'ai\.summarise'; known tasks: ai\.analyze"
    ):
        submitter.submit("ai.summarise", {"text": "x"})


def test_one_bad_payload_in_a_batch_enqueues_nothing(submitter, redis_client):
    good = {"user_id": "u", "model_type": "m"}
    with pytest.raises(PayloadError, match=r"payload\[1\]: user_id"):
        submitter.submit_many("episodes.record", [good, {"model_type": "m"}, good])
    assert messages(redis_client, "episodes") == []


def test_same_idempotency_key_returns_the_same_job_and_enqueues_once(
    submitter, redis_client, unique
):
    first = submitter.submit("maintenance.ping", {}, idempotency_key=f"k-{unique}")
    second = submitter.submit("maintenance.ping", {}, idempotency_key=f"k-{unique}")
    with pytest.raises(IdempotencyConflict, match=f"k-{unique}' was used for a different"):
        submitter.submit("maintenance.ping", {"message": "another"}, idempotency_key=f"k-{unique}")
    other = submitter.submit("maintenance.ping", {}, idempotency_key=f"k2-{unique}")
    assert second.id == first.id and second.duplicate and not first.duplicate
    assert other.id != first.id
    assert sorted(m["headers"]["id"] for m in messages(redis_client, "maintenance")) == sorted(
        [first.id, other.id]
    )


def test_submit_many_keeps_order_and_dedupes_within_the_batch(submitter, redis_client, unique):
    payloads = [{"user_id": f"u{i}", "model_type": "m"} for i in range(5)]
    payloads[2] = payloads[0]  # the same ask twice under one key
    keys = [f"a-{unique}", f"b-{unique}", f"a-{unique}", None, None]
    jobs = submitter.submit_many("episodes.record", payloads, idempotency_keys=keys)
    assert jobs[0].id == jobs[2].id and jobs[2].duplicate
    assert len({j.id for j in jobs}) == 4
    # Episodes submitted together travel packed: one message, each record's job id in order.
    [packed] = messages(redis_client, "episodes")
    assert packed["headers"][PACK_HEADER] == [jobs[i].id for i in (0, 1, 3, 4)]
    assert packed["headers"]["id"] not in {j.id for j in jobs}
    assert packed["headers"]["argsrepr"].startswith('4 records, the first: {"user_id": "u0"')
    body_args = json.loads(base64.b64decode(packed["body"]))[0]
    assert [p["user_id"] for p in body_args] == ["u0", "u1", "u3", "u4"]


def test_one_episode_is_a_plain_celery_message(submitter, redis_client):
    job = submitter.submit("episodes.record", {"user_id": "u", "model_type": "m"})
    [message] = messages(redis_client, "episodes")
    assert message["headers"]["id"] == job.id and PACK_HEADER not in message["headers"]
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([{"user_id": "u", "model_type": "m"}], {})


def test_priority_is_checked(submitter):
    with pytest.raises(ValueError, match="priority must be a whole number from 0"):
        submitter.submit("maintenance.ping", {}, priority=11)


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "submit", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=os.environ.copy(),
        timeout=60,
    )


def test_cli_exit_codes_and_messages(redis_client):
    bad_json = _cli("maintenance.ping", "--data", "{nope")
    assert bad_json.returncode == 2 and "--data is not valid JSON" in bad_json.stderr
    bad_field = _cli("maintenance.ping", "--data", '{"hold_s": 99}')
    assert (
        bad_field.returncode == 2
        and "hold_s: Input should be less than or equal to 60" in bad_field.stderr
    )
    unknown = _cli("nope.task")
    assert unknown.returncode == 2 and "unknown task 'nope.task'" in unknown.stderr
    ok = _cli("maintenance.ping", "--data", "-", stdin=json.dumps({"message": "from stdin"}))
    assert ok.returncode == 0
    job_id = ok.stdout.strip()
    [waiting] = messages(redis_client, "maintenance")
    assert waiting["headers"]["id"] == job_id


def test_a_delay_longer_than_the_visibility_window_is_refused(submitter, redis_client):
    with pytest.raises(ValueError, match="can be delayed by at most 1500 s"):
        submitter.submit("maintenance.ping", {}, countdown=3600)
    assert messages(redis_client, "maintenance") == []
    job = submitter.submit("maintenance.ping", {}, countdown=60)
    assert [m["headers"]["id"] for m in messages(redis_client, "maintenance")] == [job.id]


def test_redis_down_is_unavailable_not_a_crash(tmp_path):
    env = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
        "CONVEYOR_BROKER_MAX_RETRIES": "0",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "submit",
            "maintenance.ping",
            "--idempotency-key",
            "k",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 4, result.stderr
    assert "could not reach Redis" in result.stderr and "Traceback" not in result.stderr
