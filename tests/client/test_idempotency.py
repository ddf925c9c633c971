"""Idempotency keys never lose a job and never double one: a submitter that dies between
claiming a key and sending leaves a claim that lapses; a call that fails half-way keeps the
keys of what it sent; a key is one ask, not a handle on any payload."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conveyor import ConveyorError, Submitter
from conveyor.config import ClientConfig
from conveyor.errors import IdempotencyConflict
from tests.support.queues import messages, purge


@pytest.fixture
def clean_queues(redis_client):
    purge(redis_client, "maintenance", "episodes")
    yield
    purge(redis_client, "maintenance", "episodes")


def test_a_submitter_killed_between_claim_and_send_leaves_no_phantom_job(
    redis_url, redis_client, unique, clean_queues
):
    key = f"dies-{unique}"
    script = (
        "import os\n"
        "from conveyor import Submitter\n"
        "from conveyor.config import ClientConfig\n"
        f"s = Submitter(ClientConfig(redis_url={redis_url!r}, idempotency_pending_ttl_s=1))\n"
        "s._send = lambda *a, **k: os._exit(9)  # dies right after claiming the key\n"
        f"s.submit('maintenance.ping', {{'message': 'x'}}, idempotency_key={key!r})\n"
    )
    died = subprocess.run([sys.executable, "-c", script], env=os.environ.copy(), timeout=60)
    assert died.returncode == 9
    assert messages(redis_client, "maintenance") == []
    time.sleep(1.5)  # the dead submitter's claim lapses
    submitter = Submitter(ClientConfig(redis_url=redis_url))
    try:
        job = submitter.submit("maintenance.ping", {"message": "x"}, idempotency_key=key)
    finally:
        submitter.close()
    assert not job.duplicate
    assert [m["headers"]["id"] for m in messages(redis_client, "maintenance")] == [job.id]


def test_a_call_that_fails_half_way_keeps_the_keys_of_what_it_sent(
    redis_url, redis_client, unique, clean_queues
):
    """Packs of 3: the second pack fails. A retry re-sends only what never went out."""
    payloads = [{"user_id": f"u{i}", "model_type": "m"} for i in range(6)]
    keys = [f"half-{unique}-{i}" for i in range(6)]
    submitter = Submitter(ClientConfig(redis_url=redis_url, episodes_pack=3))
    real_send_task = submitter.app.send_task
    calls = []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("broker went away")
        return real_send_task(*args, **kwargs)

    submitter.app.send_task = failing_second
    try:
        with pytest.raises(ConveyorError, match=r"\(3 of 6 sent\)"):
            submitter.submit_many("episodes.record", payloads, idempotency_keys=keys)
        submitter.app.send_task = real_send_task
        jobs = submitter.submit_many("episodes.record", payloads, idempotency_keys=keys)
    finally:
        submitter.close()
    assert [j.duplicate for j in jobs] == [True] * 3 + [False] * 3
    sent = [j for m in messages(redis_client, "episodes") for j in m["headers"]["conveyor_pack"]]
    assert sorted(sent) == sorted(j.id for j in jobs)  # each once: none lost, none doubled


def test_a_key_is_one_ask_not_a_handle_on_any_payload(
    submitter, redis_client, unique, clean_queues
):
    key = f"ask-{unique}"
    first = submitter.submit("maintenance.ping", {"message": "a"}, idempotency_key=key)
    again = submitter.submit("maintenance.ping", {"message": "a"}, idempotency_key=key)
    assert again.id == first.id and again.duplicate
    with pytest.raises(IdempotencyConflict, match=f"job {first.id}"):
        submitter.submit("maintenance.ping", {"message": "b"}, idempotency_key=key)
    with pytest.raises(IdempotencyConflict, match="twice with different payloads"):
        submitter.submit_many(
            "maintenance.ping",
            [{"message": "c"}, {"message": "d"}],
            idempotency_keys=[key + "x"] * 2,
        )
    assert [m["headers"]["id"] for m in messages(redis_client, "maintenance")] == [first.id]
    cli = subprocess.run(
        [sys.executable, "-m", "workers.cli", "submit", "maintenance.ping", "--data",
         '{"message": "b"}', "--idempotency-key", key],
        capture_output=True, text=True, env=os.environ.copy(), timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2 and "was used for a different" in cli.stderr
