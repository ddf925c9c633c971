"""Resubmitting dead letters against real Postgres, Redis and workers: a retried dead letter is
a new job a worker runs to success, sent for its tenant; two retries at once send it once; a
payload the submitter refuses is reported and its row put back; a failed send puts the row back;
a dry run changes and sends nothing."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from conveyor import ConveyorError, Submitter
from conveyor.config import ClientConfig
from tests.support.queues import messages, purge
from workers.operations.dead_letters import (
    AlreadyResubmitted,
    DeadLetterNotFound,
    retry_dead_letters,
)
from workers.store.dead_letters import get_dead_letter, record

PING = "maintenance.ping"


@pytest.fixture
def clean_queue(redis_client):
    """Jobs these tests send and nobody runs must not wait for another test's worker."""
    purge(redis_client, "maintenance")
    yield
    purge(redis_client, "maintenance")


@pytest.fixture
def dead_letter(engine, redis_client, unique):
    """Records dead letters of this test's tenant (``acme-<unique>``); returns their job ids."""
    tenant = f"acme-{unique}"

    def make(name: str, payload: Any = None, *, task: str = PING, **fields: Any) -> str:
        job_id = f"{name}-{unique}"
        row = {
            "job_id": job_id,
            "task": task,
            "queue": "maintenance",
            "payload": {"message": job_id} if payload is None else payload,
            "reason": "exhausted",
            "error": "gave up after 3 attempts: boom",
            "attempts": 3,
            "tenant": tenant,
            **fields,
        }
        assert record(engine, redis_client, row) is True
        return job_id

    make.tenant = tenant  # type: ignore[attr-defined]
    return make


def test_a_retried_dead_letter_is_a_new_job_a_worker_runs(
    engine, submitter, workers, dead_letter, clean_queue
):
    old = dead_letter("dl")
    tenant = dead_letter.tenant
    workers.start("maintenance")
    [line] = retry_dead_letters(engine, submitter, tenant=tenant, job_id=old)
    new = line["job_id"]
    assert line == {"dead_letter": old, "task": PING, "job_id": new, "status": "resubmitted"}
    envelope = submitter.job(new).result(timeout=30)
    assert envelope["success"] is True and envelope["data"]["pong"] == old
    row = get_dead_letter(engine, old, tenant=tenant)
    assert row["resubmitted_job_id"] == new and row["resubmitted_at"].endswith("Z")

    with pytest.raises(AlreadyResubmitted, match=f"already resubmitted as job {new}") as caught:
        retry_dead_letters(engine, submitter, tenant=tenant, job_id=old)
    assert caught.value.resubmitted_job_id == new
    assert retry_dead_letters(engine, submitter, tenant=tenant) == []  # filters skip it too


def test_the_new_job_goes_out_for_the_dead_letters_tenant(
    engine, submitter, redis_client, dead_letter, clean_queue
):
    old = dead_letter("dl")
    [line] = retry_dead_letters(
        engine, submitter, tenant=None, job_id=old, request_id="req-7", traceparent=None
    )
    [message] = messages(redis_client, "maintenance")
    headers = message["headers"]
    assert headers["id"] == line["job_id"]
    assert headers["conveyor_tenant"] == dead_letter.tenant  # the operator retried it
    assert headers["conveyor_retry_of"] == old
    assert headers["conveyor_request_id"] == "req-7"


def test_a_tenant_cannot_retry_another_tenants_dead_letter(engine, submitter, dead_letter, unique):
    old = dead_letter("dl")
    with pytest.raises(DeadLetterNotFound, match=f"no dead letter with job id {old}"):
        retry_dead_letters(engine, submitter, tenant=f"globex-{unique}", job_id=old)
    assert retry_dead_letters(engine, submitter, tenant=f"globex-{unique}", dry_run=True) == []
    assert get_dead_letter(engine, old, tenant=None)["resubmitted_at"] is None


def test_two_retries_at_once_send_each_dead_letter_once(
    engine, submitter, redis_client, dead_letter, clean_queue
):
    olds = {dead_letter(f"dl{i}") for i in range(20)}
    single = dead_letter("single")
    tenant = dead_letter.tenant
    start = threading.Barrier(4)
    outcomes: list[Any] = []

    def retry(**kwargs: Any) -> None:
        start.wait()
        try:
            outcomes.append(retry_dead_letters(engine, submitter, tenant=tenant, **kwargs))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=retry) for _ in range(2)]
    threads += [threading.Thread(target=retry, kwargs={"job_id": single}) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    lines = [line for outcome in outcomes if isinstance(outcome, list) for line in outcome]
    refusals = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert len(refusals) == 1 and isinstance(refusals[0], AlreadyResubmitted), outcomes
    # Each dead letter once: the batch retries (which may also have taken `single`) and the
    # single retry that won between them.
    sent = [line["dead_letter"] for line in lines]
    assert sorted(sent) == sorted(olds | {single})
    queued = {
        m["headers"]["id"]: m["headers"]["conveyor_retry_of"]
        for m in messages(redis_client, "maintenance")
    }
    assert sorted(queued.values()) == sorted(sent)
    for line in lines:
        row = get_dead_letter(engine, line["dead_letter"], tenant=tenant)
        assert row["resubmitted_job_id"] == line["job_id"] and line["job_id"] in queued


def test_a_refused_payload_is_reported_and_its_row_put_back(
    engine, submitter, redis_client, dead_letter, clean_queue
):
    good = dead_letter("good")
    poison = dead_letter("poison", {"unstorable_json": '{"message":NaN}', "why": "not finite"})
    unknown = dead_letter("unknown", {"n": 1}, task="unknown")
    tenant = dead_letter.tenant
    retried = retry_dead_letters(engine, submitter, tenant=tenant)
    lines = {line["dead_letter"]: line for line in retried}
    assert lines[good]["status"] == "resubmitted"
    assert lines[poison] == {
        "dead_letter": poison,
        "task": PING,
        "job_id": None,
        "status": "refused",
        "error": lines[poison]["error"],
    }
    assert "unstorable_json: Extra inputs are not permitted" in lines[poison]["error"]
    assert lines[unknown]["status"] == "refused"
    assert "unknown task 'unknown'" in lines[unknown]["error"]
    for job_id in (poison, unknown):
        row = get_dead_letter(engine, job_id, tenant=tenant)
        assert (row["resubmitted_at"], row["resubmitted_job_id"]) == (None, None)
    assert [m["headers"]["id"] for m in messages(redis_client, "maintenance")] == [
        lines[good]["job_id"]
    ]


def test_a_send_that_fails_puts_the_row_back_and_raises(
    engine, redis_url, dead_letter, clean_queue
):
    old = dead_letter("dl")
    unreachable = Submitter(ClientConfig(redis_url=redis_url, broker="redis://127.0.0.1:1/0"))
    try:
        with pytest.raises(ConveyorError, match=r"could not enqueue maintenance\.ping"):
            retry_dead_letters(engine, unreachable, tenant=None, job_id=old)
    finally:
        unreachable.close()
    row = get_dead_letter(engine, old, tenant=None)
    assert (row["resubmitted_at"], row["resubmitted_job_id"]) == (None, None)


def test_a_dry_run_changes_and_sends_nothing(
    engine, submitter, redis_client, dead_letter, clean_queue
):
    good = dead_letter("good")
    poison = dead_letter("poison", {"message": 7})
    tenant = dead_letter.tenant
    lines = retry_dead_letters(engine, submitter, tenant=tenant, dry_run=True)
    assert {line["dead_letter"]: (line["status"], line["job_id"]) for line in lines} == {
        good: ("would resubmit", None),
        poison: ("refused", None),
    }
    assert "message: Input should be a valid string" in lines[1]["error"]
    [single] = retry_dead_letters(engine, submitter, tenant=tenant, job_id=good, dry_run=True)
    assert single["status"] == "would resubmit"
    assert messages(redis_client, "maintenance") == []
    for job_id in (good, poison):
        assert get_dead_letter(engine, job_id, tenant=tenant)["resubmitted_at"] is None


def test_a_job_id_and_filters_together_are_refused(engine, submitter, dead_letter):
    old = dead_letter("dl")
    with pytest.raises(ValueError, match="either one dead letter by its job id, or those"):
        retry_dead_letters(engine, submitter, tenant=None, job_id=old, task=PING)
