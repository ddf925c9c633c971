"""Delivery guarantees with real workers: nothing lost on a kill, poison ends in dead_letters."""

from __future__ import annotations

import json
import uuid

import pytest

from conveyor import keys
from tests.support.waiting import wait_for
from tests.support.workers import FAST_REDELIVERY
from workers.store import dead_letters


def _events(redis_client, job_id: str) -> list[dict]:
    entries = redis_client.xrange(keys.events_stream(job_id))
    return [json.loads(fields[b"event"]) for _, fields in entries]


def _dead_letter(engine, job_id: str) -> dict:
    return wait_for(
        lambda: dead_letters.find(engine, job_id), timeout=30, what=f"dead letter for {job_id}"
    )


def test_pickled_message_is_refused_and_dead_lettered(workers, submitter, engine, redis_client):
    workers.start("maintenance")
    pickled_id = str(uuid.uuid4())
    submitter.app.send_task(
        "maintenance.ping",
        args=({"message": "pickled"},),
        task_id=pickled_id,
        queue="maintenance",
        routing_key="maintenance",
        serializer="pickle",
    )
    after = submitter.submit("maintenance.ping", {"message": "json"})
    assert after.result(timeout=30)["success"] is True

    row = _dead_letter(engine, pickled_id)
    assert row["reason"] == "refused"
    assert row["payload"]["content_type"] == "application/x-python-serialize"
    assert "refused" in row["error"]
    # It never ran, and a caller waiting on it learns at once that it never will.
    envelope = submitter.job(pickled_id).result(timeout=10)
    assert envelope["success"] is False and "refused" in envelope["error"]
    events = _events(redis_client, pickled_id)
    assert [(e["event"], e["data"]["reason"]) for e in events] == [("maintenance_error", "refused")]


def test_payload_invalid_on_receipt_is_poison_not_retried(workers, submitter, engine, redis_client):
    worker = workers.start("maintenance")
    job_id = str(uuid.uuid4())
    # Straight to the queue, past the submitter's validation, as a buggy producer would.
    submitter.app.send_task(
        "maintenance.ping",
        args=({"hold_s": "forever"},),
        task_id=job_id,
        queue="maintenance",
        routing_key="maintenance",
    )
    envelope = submitter.job(job_id).result(timeout=30)
    assert envelope["success"] is False
    assert "hold_s: Input should be a valid number" in envelope["error"]
    row = _dead_letter(engine, job_id)
    assert (row["reason"], row["attempts"], row["task"]) == ("poison", 1, "maintenance.ping")
    assert row["payload"] == {"hold_s": "forever"}
    events = _events(redis_client, job_id)
    assert [e["event"] for e in events] == ["maintenance_error"]
    assert events[0]["type"] == "error" and events[0]["data"]["reason"] == "poison"
    # An expected end, logged once as a warning: no ERROR line, no traceback.
    lines = [line for line in worker.log().splitlines() if job_id in line]
    assert any("WARNING" in line and "ended (poison)" in line for line in lines), lines
    assert not any("ERROR" in line for line in lines), lines
    assert "Traceback" not in worker.log()


def test_unknown_task_on_a_queue_is_dead_lettered(workers, submitter, engine):
    workers.start("maintenance")
    job_id = str(uuid.uuid4())
    submitter.app.send_task(
        "maintenance.no_such_job",
        args=({},),
        task_id=job_id,
        queue="maintenance",
        routing_key="maintenance",
    )
    row = _dead_letter(engine, job_id)
    assert row["reason"] == "unregistered"
    assert "maintenance.no_such_job" in row["error"]


def _kill_mid_job(workers, submitter, redis_client, env):
    first = workers.start("maintenance", env=env)
    job = submitter.submit("maintenance.ping", {"message": "survive", "hold_s": 2.5})
    wait_for(
        lambda: any(e["event"] == "maintenance_start" for e in _events(redis_client, job.id)),
        timeout=30,
        what="job started on the first worker",
    )
    first.kill()  # SIGKILL to the worker and its pool child: no warm shutdown, no ack
    first.process.wait(10)
    second = workers.start("maintenance", env=env)
    return job, second


@pytest.mark.faults
def test_worker_sigkilled_mid_job_its_job_is_redelivered_and_completed_elsewhere(
    workers, submitter, redis_client, engine
):
    job, second = _kill_mid_job(workers, submitter, redis_client, FAST_REDELIVERY)
    envelope = job.result(timeout=60)
    assert envelope["success"] is True, envelope
    assert envelope["data"]["worker"] == second.hostname
    starts = [e for e in _events(redis_client, job.id) if e["event"] == "maintenance_start"]
    assert len(starts) == 2  # ran twice: once cut short, once to the end
    assert dead_letters.find(engine, job.id) is None


@pytest.mark.faults
def test_a_job_that_keeps_killing_workers_ends_in_dead_letters(
    workers, submitter, redis_client, engine
):
    env = {**FAST_REDELIVERY, "CONVEYOR_MAX_DELIVERIES": "1"}
    job, _ = _kill_mid_job(workers, submitter, redis_client, env)
    envelope = job.result(timeout=60)
    assert envelope["success"] is False
    assert "delivered 2 times without finishing (limit 1)" in envelope["error"]
    row = _dead_letter(engine, job.id)
    assert row["reason"] == "poison"


def test_events_are_numbered_replayable_and_published_live(workers, submitter, redis_client):
    workers.start("maintenance")
    pubsub = redis_client.pubsub()
    job_id = str(uuid.uuid4())
    pubsub.subscribe(keys.events_channel(job_id))
    wait_for(lambda: pubsub.get_message(timeout=1), what="subscribed")  # the subscribe reply
    submitter.app.send_task(
        "maintenance.ping",
        args=({"hold_s": 1.2},),
        task_id=job_id,
        queue="maintenance",
        routing_key="maintenance",
    )
    job = submitter.job(job_id, "maintenance.ping")
    replayed = list(job.events(timeout=30))
    live = []
    while len(live) < len(replayed):
        message = pubsub.get_message(timeout=5)
        assert message is not None, f"live events stopped after {live}"
        if message["type"] == "message":
            live.append(json.loads(message["data"]))
    pubsub.close()
    assert [e["seq"] for e in replayed] == list(range(1, len(replayed) + 1))
    assert replayed == live
    assert replayed[0]["event"] == "maintenance_start"
    assert replayed[-1]["type"] == "complete" and replayed[-1]["event"] == "maintenance_complete"
    assert any(e["event"] == "maintenance_progress" for e in replayed)
    for event in replayed:
        assert set(event) == {"type", "component", "event", "job_id", "seq", "data", "timestamp"}
        assert event["job_id"] == job_id and event["component"] == "maintenance"
        assert event["timestamp"].endswith("Z") and len(event["timestamp"]) == 24
    # A late listener replays the same events from the stream.
    assert list(submitter.job(job_id).events(timeout=5)) == replayed


def test_a_job_logs_nothing_when_all_goes_well_unless_asked(workers, submitter):
    """Celery's two INFO lines a job are off by default (CPU on a busy worker); on with
    CONVEYOR_LOG_JOBS=1."""
    quiet = workers.start("maintenance")
    job = submitter.submit("maintenance.ping", {"message": "quiet"})
    assert job.result(timeout=30)["success"] is True
    assert job.id not in quiet.log()
    quiet.stop()
    chatty = workers.start("maintenance", env={"CONVEYOR_LOG_JOBS": "1"})
    job = submitter.submit("maintenance.ping", {"message": "chatty"})
    assert job.result(timeout=30)["success"] is True
    chatty.wait_for_log(f"{job.id}] succeeded", timeout=10)
