"""``n8n.execute`` end to end: real ``conveyor worker n8n`` processes against a fake n8n that
speaks n8n's wire format (``tests/fakes/n8n_server.py``), real Redis and Postgres."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from conveyor import keys
from tests.fakes.n8n_server import TEST_API_KEY, FakeN8n
from tests.support.queues import messages, purge
from tests.support.waiting import wait_for
from tests.support.workers import FAST_REDELIVERY, WorkerFactory, WorkerProcess
from workers.app import TASK_MODULES
from workers.n8n import reconcile, workflows
from workers.n8n.client import N8nClient
from workers.resilience.breakers import SharedBreaker
from workers.store import dead_letters, executions

#: The workflow name the workers map to a webhook path (N8N_WORKFLOWS), as in README's example.
NAMED = {"my-hook": "orders/summarize"}


def n8n_env(base_url: str, **extra: str) -> dict[str, str]:
    """A worker aimed at the fake n8n, with fast retries and polling."""
    return {
        "N8N_BASE_URL": base_url,
        "N8N_API_KEY": TEST_API_KEY,
        "N8N_WORKFLOWS": json.dumps(NAMED),
        "N8N_READ_TIMEOUT": "5",
        "CONVEYOR_MAX_RETRIES": "2",
        "CONVEYOR_RETRY_BASE": "0.05",
        "CONVEYOR_N8N_POLL_BASE": "0.1",
        "CONVEYOR_N8N_POLL_CAP": "0.5",
        # A delivery polls in place for half a second, then goes back to the queue.
        "CONVEYOR_N8N_POLL_HOLD": "0.5",
        "CONVEYOR_N8N_RECONCILE_GRACE": "0",
        **extra,
    }


def events_of(redis_client, job_id: str) -> list[dict]:
    return [json.loads(f[b"event"]) for _, f in redis_client.xrange(keys.events_stream(job_id))]


def statuses(events: list[dict]) -> list[str]:
    """The status changes a job reported, in order."""
    return [
        e["data"]["status"]
        for e in events
        if e["event"] == "workflow_execution_progress" and "status" in e["data"]
    ]


def dead_letter(engine, job_id: str) -> dict:
    return wait_for(
        lambda: dead_letters.find(engine, job_id), timeout=15, what=f"dead letter of {job_id}"
    )


def path_for(unique: str, what: str) -> str:
    return f"{what}-{unique}"


@pytest.fixture(autouse=True)
def closed_circuit(redis_client):
    """n8n's breaker lives in Redis: every test starts with it closed."""
    redis_client.delete(keys.breaker("n8n"))
    yield
    redis_client.delete(keys.breaker("n8n"))


@pytest.fixture(scope="class")
def fake() -> Iterator[FakeN8n]:
    with FakeN8n() as server:
        server.add_sync(NAMED["my-hook"], {"total": 4})
        yield server


@pytest.fixture(scope="class")
def n8n_worker(fake, tmp_path_factory, redis_client) -> Iterator[WorkerProcess]:
    """One n8n worker for the tests that share its configuration; gone before the tests that
    start (and kill) workers of their own."""
    purge(redis_client, "n8n", "episodes")
    factory = WorkerFactory(tmp_path_factory.mktemp("n8n-worker"))
    worker = factory.start("n8n", env=n8n_env(fake.url))
    yield worker
    factory.stop_all()
    purge(redis_client, "n8n", "episodes")


@pytest.mark.usefixtures("n8n_worker")
class TestWithOneWorker:
    def test_sync_workflow_returns_its_output_once(
        self, fake, submitter, redis_client, engine, unique
    ):
        path = path_for(unique, "sync")
        fake.add_sync(path, {"sum": 4, "items": [1, 2]})
        job = submitter.submit("n8n.execute", {"workflow": path, "data": {"n": 2}, "mode": "sync"})

        envelope = job.result(timeout=30)
        assert envelope["success"] is True, envelope
        assert envelope["data"]["output"] == {"sum": 4, "items": [1, 2]}
        assert (envelope["data"]["status"], envelope["data"]["mode"]) == ("success", "sync")
        [call] = fake.received(path)
        assert call.body == {"n": 2}
        assert call.headers["x-conveyor-job-id"] == job.id
        assert "x-n8n-api-key" not in call.headers  # the key goes to the API only

        events = events_of(redis_client, job.id)
        assert {e["component"] for e in events} == {"workflow"}
        assert events[0]["event"] == "workflow_execution_start"
        assert statuses(events) == ["triggering", "success"]
        assert events[-1]["event"] == "workflow_execution_complete"
        assert events[-1]["data"]["output"] == {"sum": 4, "items": [1, 2]}

        row = executions.get(engine, job.id)
        assert (row.status, row.workflow, row.mode, row.output) == (
            "success",
            path,
            "sync",
            {"sum": 4, "items": [1, 2]},
        )
        assert row.triggered_at <= row.finished_at < row.deadline_at

    def test_the_cli_runs_a_named_workflow_and_prints_its_output(self, fake):
        before = fake.calls(NAMED["my-hook"])
        data = {"workflow": "my-hook", "data": {"n": 2}, "mode": "sync"}
        argv = ["submit", "n8n.execute", "--data", json.dumps(data), "--wait", "--timeout", "30"]
        done = subprocess.run(
            [sys.executable, "-m", "workers.cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ,
        )
        assert done.returncode == 0, done.stderr
        job_id, envelope = done.stdout.strip().splitlines()[-2:]
        envelope = json.loads(envelope)
        assert envelope["success"] is True and envelope["request_id"] == job_id
        assert envelope["data"]["output"] == {"total": 4}
        assert fake.calls(NAMED["my-hook"]) == before + 1

    def test_async_workflow_streams_its_status_then_its_output(
        self, fake, submitter, redis_client, engine, unique
    ):
        path = path_for(unique, "async")
        fake.add_async(path, {"done": True}, queued_s=0.3, run_s=0.8)
        job = submitter.submit(
            "n8n.execute", {"workflow": path, "data": {"order": 7}, "mode": "async"}
        )

        events = list(job.events(timeout=30))
        assert events[-1]["event"] == "workflow_execution_complete", events
        assert events[-1]["data"]["output"] == [{"done": True}]
        [execution_id] = fake.executions(path)
        assert events[-1]["data"]["execution_id"] == execution_id
        seen = statuses(events)
        assert seen[:2] == ["triggering", "new"] and seen[-1] == "success"
        assert "running" in seen
        assert len(seen) == len(set(seen))  # one event per change, not per poll
        # Longer than one delivery may hold it: followed in steps, through the queue.
        assert any(e["data"].get("deferred") for e in events)
        assert job.result(timeout=5)["data"]["output"] == [{"done": True}]
        assert fake.calls(path) == 1
        assert executions.get(engine, job.id).n8n_execution_id == execution_id

    def test_a_failing_workflow_fails_the_job_with_n8ns_message_and_node(
        self, fake, submitter, redis_client, engine, unique
    ):
        early, late = path_for(unique, "fails-async"), path_for(unique, "fails-sync")
        message = "Cannot read properties of undefined (reading 'total') [line 3]"
        fake.add_failing(early, message=message, node="Compute total", run_s=0.3)
        fake.add_failing(late, message=message, node="Compute total", early=False, run_s=0.2)
        async_job = submitter.submit("n8n.execute", {"workflow": early, "mode": "async"})
        sync_job = submitter.submit("n8n.execute", {"workflow": late, "mode": "sync"})

        envelope = async_job.result(timeout=30)
        assert envelope["success"] is False
        assert message in envelope["error"] and "'Compute total'" in envelope["error"]
        events = events_of(redis_client, async_job.id)
        [failed] = [e["data"] for e in events if e["data"].get("status") == "error"]
        assert (failed["error"], failed["node"]) == (message, "Compute total")
        assert events[-1]["type"] == "error"
        assert events[-1]["data"]["reason"] == "workflow_failed"
        row = dead_letter(engine, async_job.id)
        assert (row["reason"], row["attempts"]) == ("workflow_failed", 1)
        stored = executions.get(engine, async_job.id)
        assert (stored.status, stored.error, stored.error_node) == (
            "error",
            message,
            "Compute total",
        )

        envelope = sync_job.result(timeout=30)  # n8n's "500 Error in workflow": it ran, failed
        assert envelope["success"] is False and "Error in workflow" in envelope["error"]
        assert dead_letter(engine, sync_job.id)["reason"] == "workflow_failed"
        assert (fake.calls(early), fake.calls(late)) == (1, 1)  # neither retried

    def test_404_and_401_fail_fast_with_a_clear_message(self, fake, submitter, engine, unique):
        missing = submitter.submit("n8n.execute", {"workflow": path_for(unique, "nowhere")})
        envelope = missing.result(timeout=15)
        assert envelope["success"] is False
        assert "webhook path not registered" in envelope["error"]
        assert "active/published" in envelope["error"]

        path = path_for(unique, "guarded")
        fake.add_sync(path, {"never": "seen"})
        fake.fail_next(1, status=401, body={"message": "Authorization data is wrong!"})
        refused = submitter.submit("n8n.execute", {"workflow": path})
        envelope = refused.result(timeout=15)
        assert envelope["success"] is False
        assert "401" in envelope["error"] and "Authorization data is wrong!" in envelope["error"]
        assert fake.calls(path) == 1
        for job in (missing, refused):
            row = dead_letter(engine, job.id)
            assert (row["reason"], row["attempts"]) == ("permanent", 1)
            assert executions.get(engine, job.id).status == "not_triggered"

    def test_n8n_starting_up_is_retried_and_runs_the_workflow_once(
        self, fake, submitter, redis_client, engine, unique
    ):
        # While n8n starts it answers every request itself, before any webhook is looked up:
        # 503 "Database is not ready!", then a 200 text page. Neither started a run.
        path = path_for(unique, "starting")
        fake.add_sync(path, {"ok": True})
        fake.database_not_ready(1)
        fake.starting_up(1)
        job = submitter.submit("n8n.execute", {"workflow": path, "mode": "sync"})

        envelope = job.result(timeout=30)
        assert envelope["success"] is True, envelope
        assert envelope["data"]["output"] == {"ok": True}  # not the "starting up" page
        assert (fake.calls(path), fake.runs(path)) == (3, 1)
        retries = [e for e in events_of(redis_client, job.id) if e["data"].get("retrying")]
        assert len(retries) == 2
        assert "Database is not ready!" in retries[0]["data"]["error"]
        assert "starting up" in retries[1]["data"]["error"]
        assert dead_letters.find(engine, job.id) is None
        assert executions.get(engine, job.id).status == "success"

    def test_an_async_run_waits_for_n8n_to_start_up(self, fake, submitter, engine, unique):
        path = path_for(unique, "starting-async")
        fake.add_async(path, {"done": True}, queued_s=0.05, run_s=0.1)
        fake.starting_up(1)
        job = submitter.submit("n8n.execute", {"workflow": path, "mode": "async"})

        envelope = job.result(timeout=30)
        assert envelope["success"] is True, envelope
        assert envelope["data"]["output"] == [{"done": True}]
        [execution_id] = fake.executions(path)
        assert envelope["data"]["execution_id"] == execution_id
        assert (fake.calls(path), fake.runs(path)) == (2, 1)
        assert dead_letters.find(engine, job.id) is None

    def test_a_trigger_that_may_have_run_is_never_fired_again(
        self, fake, submitter, engine, unique
    ):
        # A redelivered job whose earlier delivery died between claiming the trigger and
        # recording n8n's answer: the row says "triggering".
        path = path_for(unique, "interrupted")
        fake.add_sync(path, {"twice": "never"})
        job_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        executions.claim(
            engine,
            job_id,
            workflow=path,
            mode="sync",
            input={"workflow": path, "data": {}, "mode": "sync"},
            now=now,
            deadline_at=now + timedelta(minutes=5),
        )
        submitter.app.send_task(
            "n8n.execute",
            args=({"workflow": path, "mode": "sync"},),
            task_id=job_id,
            queue="n8n",
            routing_key="n8n",
        )
        envelope = submitter.job(job_id).result(timeout=15)
        assert envelope["success"] is False
        assert "interrupted while triggering" in envelope["error"]
        assert "X-Conveyor-Job-Id" in envelope["error"]
        assert fake.calls(path) == 0
        assert dead_letter(engine, job_id)["reason"] == "unknown_outcome"
        assert executions.get(engine, job_id).status == "outcome_unknown"

        # A webhook that took the request and dropped the connection: not retried either.
        stalled = path_for(unique, "stalled")
        fake.add_stall(stalled, drop_after_s=0.3)
        job = submitter.submit("n8n.execute", {"workflow": stalled, "mode": "sync"})
        envelope = job.result(timeout=15)
        assert envelope["success"] is False and "n8n may be running it" in envelope["error"]
        assert fake.calls(stalled) == 1
        assert dead_letter(engine, job.id)["reason"] == "unknown_outcome"

    def test_an_async_run_the_webhook_gives_no_execution_id_for_is_a_clear_error(
        self, fake, submitter, unique
    ):
        path = path_for(unique, "immediately")
        fake.add_sync(path, {"message": "Workflow was started"})  # response mode "Immediately"
        job = submitter.submit("n8n.execute", {"workflow": path, "mode": "async"})
        envelope = job.result(timeout=15)
        assert envelope["success"] is False
        assert "without an execution id" in envelope["error"]
        assert "Respond to Webhook" in envelope["error"]
        assert fake.calls(path) == 1

    def test_each_execution_is_recorded_as_an_episode(
        self, fake, submitter, redis_client, engine, workers, unique
    ):
        path = path_for(unique, "episode")
        fake.add_sync(path, {"reply": "hello"})
        payload = {
            "workflow": path,
            "data": {"text": "hi"},
            "user_id": "u-7",
            "session_id": "s-7",
            "metadata": {"source": "test"},
        }
        job = submitter.submit("n8n.execute", payload)
        anonymous = submitter.submit("n8n.execute", {"workflow": path, "data": {"n": 1}})
        assert job.result(timeout=30)["success"] is True
        assert anonymous.result(timeout=30)["success"] is True

        if "tasks.episodes" in TASK_MODULES:  # the episodes pool exists: the row itself
            workers.start("episodes")
            episode = wait_for(lambda: _episode_row(engine, job.id), timeout=30, what="episode row")
            other = wait_for(
                lambda: _episode_row(engine, anonymous.id), timeout=30, what="episode row"
            )
        else:  # not yet: the message waiting for it
            episode = _queued_episode(redis_client, job.id)
            other = _queued_episode(redis_client, anonymous.id)
        assert episode["model_type"] == f"n8n:{path}"
        assert json.loads(episode["prompt"]) == {"text": "hi"}
        assert json.loads(episode["response"]) == {"reply": "hello"}
        assert (episode["user_id"], episode["session_id"]) == ("u-7", "s-7")
        assert episode["status"] == "success" and episode["job_id"] == job.id
        assert episode["metadata"]["source"] == "test"
        assert other["user_id"] == "anonymous"

    def test_a_run_past_the_jobs_deadline_is_finished_by_the_reconciler(
        self, fake, submitter, redis_client, engine, workers, unique
    ):
        path = path_for(unique, "slow")
        fake.add_async(path, {"late": True}, queued_s=0.1, run_s=600.0)  # ended by the test
        maintenance = workers.start(
            "maintenance", env={**n8n_env(fake.url), "CONVEYOR_LOG_JOBS": "1"}, wait=False
        )
        job = submitter.submit("n8n.execute", {"workflow": path, "mode": "async", "timeout_s": 1.5})
        handed = wait_for(
            lambda: [e for e in events_of(redis_client, job.id) if e["data"].get("handed_over")],
            timeout=20,
            what="the job handing its execution over",
        )
        assert handed[0]["data"]["reconciler"] == "maintenance.reconcile_workflows"
        assert job.status() == "STARTED"  # no result yet, no terminal event
        assert executions.get(engine, job.id).status == "running"
        maintenance.wait_ready()

        early = submitter.submit("maintenance.reconcile_workflows", {}).result(timeout=30)
        assert early["success"] is True and early["data"]["executions"].get("running", 0) >= 1
        assert job.status() == "STARTED"
        [execution_id] = fake.executions(path)
        fake.finish(execution_id)
        late = submitter.submit("maintenance.reconcile_workflows", {}).result(timeout=30)
        assert late["data"]["executions"].get("success", 0) >= 1, late

        envelope = job.result(timeout=15)
        assert envelope["success"] is True, envelope
        assert envelope["data"]["output"] == [{"late": True}]
        events = events_of(redis_client, job.id)
        assert [e["type"] for e in events].count("complete") == 1
        assert events[-1]["event"] == "workflow_execution_complete"
        assert statuses(events)[-1] == "success"
        assert executions.get(engine, job.id).status == "success"
        assert fake.calls(path) == 1
        assert "maintenance.reconcile_workflows" in maintenance.log()


def default_retries_env(base_url: str) -> dict[str, str]:
    """A worker with the default retries (6: a retried trigger would run up to 7 times)."""
    env = n8n_env(base_url)
    del env["CONVEYOR_MAX_RETRIES"]
    # Every run shows in the fake's count, rather than a circuit opened after five of them.
    env["CONVEYOR_N8N_BREAKER_FAIL_MAX"] = "100"
    return env


@pytest.fixture(scope="class")
def default_retries_worker(fake, tmp_path_factory, redis_client) -> Iterator[WorkerProcess]:
    purge(redis_client, "n8n", "episodes")
    factory = WorkerFactory(tmp_path_factory.mktemp("n8n-default-retries"))
    worker = factory.start("n8n", env=default_retries_env(fake.url))
    yield worker
    factory.stop_all()
    purge(redis_client, "n8n", "episodes")


@pytest.mark.usefixtures("default_retries_worker")
class TestAnErrorAfterTheRun:
    """n8n answers some 5xx after it ran the workflow, and a Respond to Webhook node answers any
    status after the work before it: the job runs the workflow once and ends as an unknown
    outcome, however many retries it has (issue #14, item 5)."""

    def test_no_item_to_return_runs_the_workflow_once(
        self, fake, submitter, redis_client, engine, unique
    ):
        path = path_for(unique, "no-item")
        fake.add_no_item(path)  # "When last node finishes", and the last node returned nothing
        job = submitter.submit("n8n.execute", {"workflow": path, "data": {"n": 1}, "mode": "sync"})

        envelope = _ran_once_then_unknown(fake, redis_client, engine, job, path)
        assert "No item to return was found" in envelope["error"]
        assert "returned no item" in envelope["error"]

    @pytest.mark.parametrize("status", [502, 503])
    def test_a_respond_to_webhook_5xx_runs_the_workflow_once(
        self, fake, submitter, redis_client, engine, unique, status
    ):
        path = path_for(unique, f"respond-{status}")
        fake.add_responding(path, status=status, body={"error": "CRM rejected the order"})
        job = submitter.submit("n8n.execute", {"workflow": path, "data": {"n": 1}, "mode": "sync"})

        envelope = _ran_once_then_unknown(fake, redis_client, engine, job, path)
        assert f"answered {status}" in envelope["error"]

    def test_an_async_workflows_error_answer_runs_it_once(
        self, fake, submitter, redis_client, engine, unique
    ):
        path = path_for(unique, "respond-async")
        fake.add_responding(path, status=500, body={"message": "Respond to Webhook failed"})
        job = submitter.submit("n8n.execute", {"workflow": path, "mode": "async"})

        envelope = _ran_once_then_unknown(fake, redis_client, engine, job, path)
        assert "Respond to Webhook failed" in envelope["error"]


def _ran_once_then_unknown(fake, redis_client, engine, job, path: str) -> dict:
    """The job ran ``path`` exactly once, kept its claim and failed as an unknown outcome."""
    envelope = job.result(timeout=30)
    assert envelope["success"] is False, envelope
    assert (fake.calls(path), fake.runs(path)) == (1, 1)  # one POST, one run: never retried
    assert "X-Conveyor-Job-Id" in envelope["error"] and job.id in envelope["error"]
    events = events_of(redis_client, job.id)
    assert not [e for e in events if e["data"].get("retrying")]
    assert events[-1]["type"] == "error"
    assert events[-1]["data"]["reason"] == "unknown_outcome"
    row = dead_letter(engine, job.id)
    assert (row["reason"], row["attempts"]) == ("unknown_outcome", 1)
    assert executions.get(engine, job.id).status == "outcome_unknown"  # the claim is kept
    return envelope


@pytest.mark.faults
def test_a_worker_killed_while_following_is_followed_to_the_end_by_another(
    workers, n8n_server, submitter, redis_client, engine, unique
):
    purge(redis_client, "n8n")
    # CONVEYOR_LOG_JOBS: the second worker's log says it took the job over.
    env = n8n_env(n8n_server.url, **FAST_REDELIVERY, CONVEYOR_LOG_JOBS="1")
    first = workers.start("n8n", env=env)
    path = path_for(unique, "survive")
    n8n_server.add_async(path, {"survived": True}, queued_s=0.2, run_s=5.0)
    job = submitter.submit("n8n.execute", {"workflow": path, "mode": "async", "timeout_s": 120})
    wait_for(
        lambda: "running" in statuses(events_of(redis_client, job.id)),
        timeout=20,
        what="the first worker following the execution",
    )
    first.kill()  # SIGKILL: no warm shutdown, nothing acknowledged
    first.process.wait(10)
    second = workers.start("n8n", env=env)

    envelope = job.result(timeout=45)
    assert envelope["success"] is True, envelope
    assert envelope["data"]["output"] == [{"survived": True}]
    assert n8n_server.calls(path) == 1  # the webhook was called exactly once
    [execution_id] = n8n_server.executions(path)
    assert envelope["data"]["execution_id"] == execution_id
    assert job.id in second.log()
    starts = [e for e in events_of(redis_client, job.id) if e["event"].endswith("_start")]
    assert len(starts) >= 2  # started on the first worker, resumed on the second
    assert statuses(events_of(redis_client, job.id)).count("triggering") == 1


def test_connection_refused_is_retried_then_dead_lettered(workers, submitter, redis_client, engine):
    purge(redis_client, "n8n")
    workers.start("n8n", env=n8n_env(f"http://127.0.0.1:{_closed_port()}"))
    job = submitter.submit("n8n.execute", {"workflow": "my-hook", "data": {"n": 2}})

    envelope = job.result(timeout=30)
    assert envelope["success"] is False
    assert "gave up after 3 attempts" in envelope["error"] and "unreachable" in envelope["error"]
    row = dead_letter(engine, job.id)
    assert (row["reason"], row["attempts"]) == ("exhausted", 3)
    assert row["payload"] == {"workflow": "my-hook", "data": {"n": 2}}
    retries = [e for e in events_of(redis_client, job.id) if e["data"].get("retrying")]
    assert len(retries) == 2
    assert executions.get(engine, job.id).status == "not_triggered"


def test_a_job_on_a_worker_without_n8n_fails_clearly(workers, submitter, redis_client, engine):
    purge(redis_client, "n8n")
    workers.start("n8n", env={"N8N_BASE_URL": "", "N8N_API_KEY": ""})
    job = submitter.submit("n8n.execute", {"workflow": "my-hook"})
    envelope = job.result(timeout=15)
    assert envelope["success"] is False and "N8N_BASE_URL" in envelope["error"]
    assert dead_letter(engine, job.id)["reason"] == "permanent"
    assert executions.get(engine, job.id) is None  # nothing claimed, nothing triggered


def test_the_reconciler_reports_a_failed_run_and_one_it_cannot_read(
    n8n_server, engine, redis_client, unique
):
    """The plain reconciler, in process: what a beat run does with executions left behind."""
    failing = path_for(unique, "late-failure")
    n8n_server.add_failing(failing, message="Timeout awaiting 'request'", node="HTTP Request")
    failed_job, lost_job = str(uuid.uuid4()), str(uuid.uuid4())
    reported = _Recorder()
    with N8nClient(n8n_server.url, TEST_API_KEY, connect_timeout_s=2, read_timeout_s=5) as client:
        answer = client.trigger(failing, {"n": 1}, idempotency_key=failed_job)
        past = datetime.now(UTC) - timedelta(minutes=1)
        for job_id, execution_id in ((failed_job, answer.execution_id), (lost_job, "999999")):
            executions.claim(
                engine,
                job_id,
                workflow=failing,
                mode="async",
                input={"workflow": failing, "data": {"n": 1}, "mode": "async"},
                now=past - timedelta(minutes=5),
                deadline_at=past,
            )
            executions.transition(
                engine,
                job_id,
                expected={"triggering"},
                status="running",
                n8n_execution_id=execution_id,
            )
        wait_for(
            lambda: n8n_server.execution_json(answer.execution_id)["status"] == "error",
            timeout=10,
            what="the failing execution's end",
        )
        runtime = workflows.Runtime(
            client=client,
            engine=engine,
            breaker=SharedBreaker(redis_client, "n8n"),
            settings=workflows.FollowSettings(poll_base_s=0.1, poll_cap_s=0.5, hold_s=1.0),
        )
        counts = reconcile.reconcile(runtime, reported, grace_s=0, limit=50, budget_s=30)

    assert counts.get("failed", 0) >= 1 and counts.get("unknown", 0) >= 1, counts
    message, reason = reported.failures[failed_job]
    assert reason == "workflow_failed"
    assert "Timeout awaiting 'request'" in message and "'HTTP Request'" in message
    assert reported.events[failed_job][-1]["node"] == "HTTP Request"
    assert executions.get(engine, failed_job).status == "error"
    message, reason = reported.failures[lost_job]
    assert reason == "unknown_outcome" and "999999 not found" in message
    assert executions.get(engine, lost_job).status == "outcome_unknown"
    assert n8n_server.calls(failing) == 1


def test_poll_delay_grows_with_the_executions_age_within_its_bounds():
    rng = random.Random(7)
    bounds = {0: (0.25, 0.5), 1: (0.5, 1.0), 10: (4.0, 8.0), 100: (15.0, 30.0), 1e6: (15.0, 30.0)}
    for age, (low, high) in bounds.items():
        assert low <= workflows.poll_delay(age, base_s=0.5, cap_s=30.0, rng=rng) <= high


class _Recorder:
    """A ``reconcile.Reconciled`` that remembers what it was told, by job id."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict]] = {}
        self.successes: dict[str, dict] = {}
        self.failures: dict[str, tuple[str, str]] = {}

    def progress(self, row, data: dict) -> None:
        self.events.setdefault(row.job_id, []).append(data)

    def succeeded(self, row, data: dict) -> None:
        self.successes[row.job_id] = data

    def failed(self, row, message: str, reason: str) -> None:
        self.failures[row.job_id] = (message, reason)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queued_episode(redis_client, job_id: str) -> dict:
    found = [
        m for m in messages(redis_client, "episodes") if m["headers"]["id"] == f"episode-{job_id}"
    ]
    assert len(found) == 1, f"expected one episodes.record message for {job_id}"
    assert found[0]["headers"]["task"] == "episodes.record"
    args, _kwargs, _embed = json.loads(base64.b64decode(found[0]["body"]))
    return args[0]


def _episode_row(engine, job_id: str) -> dict | None:
    from sqlalchemy import select

    from workers.store.models import EpisodicLog

    with engine.connect() as conn:
        row = conn.execute(
            select(EpisodicLog.__table__).where(EpisodicLog.job_id == job_id)
        ).first()
    return dict(row._mapping) if row is not None else None
