"""The ai.* jobs through real `conveyor worker ai` processes against a fake provider that
speaks OpenAI's and Ollama's wire formats, including their failures."""

from __future__ import annotations

import time

import pytest

from tests.fakes.llm_server import OPENAI_PATH, FakeLLMServer, Reply
from tests.support.ai import SECRET, ai_env, events_of, fresh_upstream_state  # noqa: F401
from tests.support.queues import messages
from tests.support.waiting import wait_for
from tests.support.workers import WorkerFactory
from workers.store import dead_letters

#: Each test starts with closed circuits, full budgets and empty queues.
pytestmark = pytest.mark.usefixtures("fresh_upstream_state")


@pytest.fixture(scope="module")
def shared_llm():
    with FakeLLMServer() as server:
        yield server


@pytest.fixture(scope="module")
def ai_worker(shared_llm, tmp_path_factory):
    """One ai worker for the tests that share its configuration."""
    factory = WorkerFactory(tmp_path_factory.mktemp("ai-worker"))
    worker = factory.start("ai", env=ai_env(shared_llm))
    yield worker
    factory.stop_all()


@pytest.fixture
def llm(shared_llm, ai_worker):
    shared_llm.requests.clear()
    shared_llm.default = Reply.ok()
    while shared_llm._script:
        shared_llm.next_reply()
    return shared_llm


def test_chat_streams_coalesced_progress_then_completes_and_logs_its_episode(
    llm, ai_worker, submitter, redis_client
):
    words = [f"w{i} " for i in range(12)]
    llm.script(Reply.ok(chunks=tuple(words), chunk_delay_s=0.03))
    job = submitter.submit(
        "ai.chat",
        {"messages": [{"role": "user", "content": "count"}], "user_id": "u-1", "session_id": "s-1"},
    )
    envelope = job.result(timeout=30)
    assert envelope["success"] is True, envelope
    data = envelope["data"]
    assert data["content"] == "".join(words)
    assert (data["provider"], data["model"], data["finish_reason"]) == (
        "default",
        "fake-model",
        "stop",
    )
    assert data["tokens"]["estimated"] is False
    assert data["tokens"]["total"] == data["tokens"]["prompt"] + data["tokens"]["completion"] > 0
    assert data["ttft_ms"] is not None and data["latency_ms"] >= data["ttft_ms"]

    events = events_of(redis_client, job.id)
    names = [e["event"] for e in events]
    assert names[0] == "ai_generation_start" and names[-1] == "ai_generation_complete"
    progress = [e["data"] for e in events if e["event"] == "ai_generation_progress"]
    assert "".join(p["delta"] for p in progress) == data["content"]
    assert [p["offset"] for p in progress] == [
        sum(len(q["delta"]) for q in progress[:i]) for i in range(len(progress))
    ]
    assert 1 <= len(progress) < len(words)  # coalesced: fewer events than chunks

    [request] = llm.requests
    assert request.path == OPENAI_PATH
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in ai_worker.log()

    [episode] = [
        m for m in messages(redis_client, "episodes") if m["headers"]["id"] == f"episode-{job.id}"
    ]
    assert episode["headers"]["task"] == "episodes.record"


def test_429_is_retried_after_its_retry_after(llm, submitter, redis_client):
    llm.script(Reply.rate_limited(retry_after="1"), Reply.ok("after the wait"))
    job = submitter.submit("ai.generate", {"prompt": "hi"})
    envelope = job.result(timeout=30)
    assert envelope["success"] is True and envelope["data"]["content"] == "after the wait"
    assert len(llm.requests) == 2
    retrying = [e for e in events_of(redis_client, job.id) if e["data"].get("retrying")]
    assert [e["data"]["next_attempt_in_s"] for e in retrying] == [1.0]
    assert "429" in retrying[0]["data"]["error"]


def test_client_errors_fail_fast_into_dead_letters(llm, submitter, engine):
    llm.script(Reply.context_exceeded())
    job = submitter.submit("ai.generate", {"prompt": "a very long prompt"})
    envelope = job.result(timeout=30)
    assert envelope["success"] is False
    assert "exceed_context_size" in envelope["error"] or "context" in envelope["error"]
    assert len(llm.requests) == 1  # no retry
    row = wait_for(lambda: dead_letters.find(engine, job.id), what="dead letter")
    assert (row["reason"], row["attempts"]) == ("permanent", 1)


def test_server_errors_are_retried_then_dead_lettered(llm, submitter, engine, redis_client):
    llm.default = Reply.server_error(503)
    job = submitter.submit("ai.generate", {"prompt": "hi"})
    envelope = job.result(timeout=30)
    assert envelope["success"] is False
    assert "gave up after 3 attempts" in envelope["error"]
    assert len(llm.requests) == 3  # CONVEYOR_MAX_RETRIES=2
    row = wait_for(lambda: dead_letters.find(engine, job.id), what="dead letter")
    assert row["reason"] == "exhausted" and row["payload"] == {"prompt": "hi"}
    assert events_of(redis_client, job.id)[-1]["event"] == "ai_generation_error"


def test_a_stream_cut_midway_is_retried_from_the_start(llm, submitter, redis_client):
    llm.script(Reply.cut(after=2), Reply.ok("the whole answer"))
    job = submitter.submit("ai.chat", {"messages": [{"role": "user", "content": "hi"}]})
    envelope = job.result(timeout=30)
    assert envelope["success"] is True and envelope["data"]["content"] == "the whole answer"
    starts = [e for e in events_of(redis_client, job.id) if e["event"] == "ai_generation_start"]
    assert [s["data"]["attempt"] for s in starts] == [1, 2]


def test_code_and_analysis_answers_are_shaped_and_checked(llm, submitter, engine):
    llm.script(
        Reply.ok("Here it is:\n```python\nprint('fizz')\n```\nThat prints fizz."),
        Reply.ok('{"label": "positive", "score": 0.8}'),
        Reply.ok("I would say it is rather positive."),
    )
    code = submitter.submit("ai.code", {"instruction": "print fizz", "language": "python"})
    assert code.result(timeout=30)["data"]["code_blocks"] == [
        {"language": "python", "code": "print('fizz')"}
    ]
    good = submitter.submit("ai.analyze", {"text": "I love it", "kind": "sentiment"})
    analysis = good.result(timeout=30)["data"]
    assert (analysis["label"], analysis["score"]) == ("positive", 0.8)
    bad = submitter.submit("ai.analyze", {"text": "I love it", "kind": "sentiment"})
    envelope = bad.result(timeout=30)
    assert envelope["success"] is False
    assert "did not answer with a JSON object" in envelope["error"]
    row = wait_for(lambda: dead_letters.find(engine, bad.id), what="dead letter")
    assert row["reason"] == "invalid_answer"


def test_cancel_stops_a_streaming_generation_and_says_so(llm, submitter, redis_client, engine):
    llm.script(Reply.ok(chunks=tuple(f"t{i} " for i in range(100)), chunk_delay_s=0.1))
    job = submitter.submit("ai.generate", {"prompt": "go on"})
    wait_for(
        lambda: any(
            e["event"] == "ai_generation_progress" for e in events_of(redis_client, job.id)
        ),
        what="first progress",
    )
    asked = time.monotonic()
    submitter.cancel(job.id)
    envelope = job.result(timeout=30)
    stopped_after = time.monotonic() - asked
    assert envelope["success"] is False and "cancelled" in envelope["error"]
    assert stopped_after < 3, stopped_after
    last = events_of(redis_client, job.id)[-1]
    assert (last["type"], last["data"]["reason"]) == ("error", "cancelled")
    assert llm.wait_for_hangup(5)  # the stream was closed, not read to its end
    assert dead_letters.find(engine, job.id) is None
    assert job.status() == "REVOKED"  # Flower and callers see a cancellation, not a failure


def test_a_job_run_twice_records_one_episode(llm, workers, submitter, engine):
    from sqlalchemy import text

    workers.start("episodes")
    llm.script(Reply.ok("first run"), Reply.ok("second run"))
    payload = {"prompt": "once", "user_id": "u-twice"}
    job = submitter.submit("ai.generate", payload)
    assert job.result(timeout=30)["success"] is True
    # The same message again, as a redelivery after a lost acknowledgement would bring it.
    submitter.app.send_task(
        "ai.generate", args=(payload,), task_id=job.id, queue="ai", routing_key="ai"
    )
    wait_for(lambda: len(llm.requests) == 2, what="the second run")

    def rows():
        with engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT episode_id, response, model_type FROM episodic_logs WHERE job_id = :j"
                ),
                {"j": job.id},
            ).all()

    wait_for(rows, what="the episode row")
    time.sleep(1.0)  # give the second episode message time to land, if it were to
    [(episode_id, response, model_type)] = rows()
    assert episode_id == f"job:{job.id}" and model_type == "default:fake-model"
    assert response == "first run"


def test_history_recalls_the_sessions_last_episodes_in_order(llm, workers, submitter, engine):
    workers.start("episodes")
    session = f"s-{time.monotonic_ns()}"
    for i in range(3):
        submitter.submit(
            "episodes.record",
            {
                "user_id": "u",
                "session_id": session,
                "model_type": "m",
                "prompt": f"question {i}",
                "response": f"answer {i}",
                "timestamp": f"2026-11-0{i + 1}T10:00:00Z",
            },
        )
    from workers.store.episodes import query_episodes

    wait_for(
        lambda: len(query_episodes(engine, session_id=session).episodes) == 3, what="three episodes"
    )
    job = submitter.submit(
        "ai.chat",
        {
            "messages": [{"role": "user", "content": "and now?"}],
            "session_id": session,
            "history": 2,
        },
    )
    assert job.result(timeout=30)["success"] is True
    sent = [(m["role"], m["content"]) for m in llm.requests[-1].body["messages"]]
    assert sent == [
        ("user", "question 1"),
        ("assistant", "answer 1"),
        ("user", "question 2"),
        ("assistant", "answer 2"),
        ("user", "and now?"),
    ]


def test_episodes_of_jobs_ending_together_share_a_message_and_land_once(
    llm, workers, submitter, redis_client, engine
):
    from sqlalchemy import text

    from conveyor.messages import PACK_HEADER

    llm.default = Reply.ok("the same answer", chunk_delay_s=0.05)
    jobs = submitter.submit_many("ai.generate", [{"prompt": f"p{i}"} for i in range(8)])
    for job in jobs:
        assert job.result(timeout=30)["success"] is True
    # Every job waited for its episode's message: all are queued by now.
    queued = messages(redis_client, "episodes")
    records = [
        record_id
        for m in queued
        for record_id in (m["headers"].get(PACK_HEADER) or [m["headers"]["id"]])
    ]
    assert sorted(records) == sorted(f"episode-{job.id}" for job in jobs)
    assert len(queued) < len(jobs), "jobs that end together share a message"

    workers.start("episodes")

    def rows():
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT episode_id FROM episodic_logs WHERE job_id = ANY(:ids)"),
                {"ids": [job.id for job in jobs]},
            ).all()

    wait_for(lambda: len(rows()) == len(jobs), what="one episode row per job")
    assert sorted(r[0] for r in rows()) == sorted(f"job:{job.id}" for job in jobs)


def test_an_empty_answer_is_told_from_a_cut_one_and_not_retried(llm, submitter, engine):
    """llama.cpp's server answers a prompt longer than its context with an empty 200 stream:
    complete, not cut. Retrying cannot help: one request, a permanent failure naming why."""
    llm.script(Reply(raw=(b"",)))
    job = submitter.submit("ai.generate", {"prompt": "word " * 400})
    envelope = job.result(timeout=30)
    assert envelope["success"] is False
    assert "empty stream" in envelope["error"] and "about 504 tokens" in envelope["error"]
    assert len(llm.requests) == 1
    row = wait_for(lambda: dead_letters.find(engine, job.id), what="dead letter")
    assert (row["reason"], row["attempts"]) == ("permanent", 1)
