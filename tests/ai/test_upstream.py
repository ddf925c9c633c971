"""The ai pool against upstreams that fail: fallbacks and circuits shared by several worker
processes, the shared rate limit, and the Ollama wire format. Each test runs workers of its
own configuration (no shared worker here, so none competes for the jobs)."""

from __future__ import annotations

import json
import time

import pytest

from tests.fakes.llm_server import OLLAMA_PATH, FakeLLMServer, Reply
from tests.support.ai import ai_env, events_of, fresh_upstream_state  # noqa: F401
from tests.support.waiting import wait_for
from tests.support.workers import WorkerFactory

#: Each test starts with closed circuits, full budgets and empty queues.
pytestmark = pytest.mark.usefixtures("fresh_upstream_state")


def test_ollama_native_provider_by_name(llm_server, submitter, tmp_path):
    llm = llm_server
    factory = WorkerFactory(tmp_path)
    providers = {"ollama": {"kind": "ollama", "base_url": llm.url, "model": "llama3"}}
    try:
        factory.start("ai", env=ai_env(llm, CONVEYOR_PROVIDERS=json.dumps(providers)))
        llm.script(Reply.ok("bonjour"))
        job = submitter.submit(
            "ai.chat", {"messages": [{"role": "user", "content": "hi"}], "provider": "ollama"}
        )
        envelope = job.result(timeout=30)
    finally:
        factory.stop_all()
    assert envelope["success"] is True, envelope
    assert envelope["data"]["content"] == "bonjour" and envelope["data"]["provider"] == "ollama"
    assert llm.requests[-1].path == OLLAMA_PATH and llm.requests[-1].body["model"] == "llama3"


@pytest.mark.faults
def test_open_circuit_sends_jobs_to_the_fallback_for_every_worker(submitter, tmp_path):
    factory = WorkerFactory(tmp_path)
    with (
        FakeLLMServer(default=Reply.server_error(502)) as primary,
        FakeLLMServer(default=Reply.ok("from backup", chunk_delay_s=0.05)) as backup,
    ):
        backup_config = {"kind": "openai", "base_url": backup.openai_url, "model": "b-model"}
        env = ai_env(
            primary,
            LLM_FALLBACKS="backup",
            CONVEYOR_BREAKER_FAIL_MAX="2",
            CONVEYOR_MAX_RETRIES="5",
            CONVEYOR_AI_CONCURRENCY="2",
            CONVEYOR_PROVIDERS=json.dumps({"backup": backup_config}),
        )
        try:
            env = {**env, "CONVEYOR_LOG_JOBS": "1"}  # which worker ran what: its job lines
            first, second = factory.start("ai", env=env), factory.start("ai", env=env)
            opener = submitter.submit("ai.generate", {"prompt": "hi"})
            assert opener.result(timeout=30)["data"]["provider"] == "backup"
            jobs = submitter.submit_many("ai.generate", [{"prompt": f"p{i}"} for i in range(8)])
            results = [j.result(timeout=30) for j in jobs]
        finally:
            factory.stop_all()
    assert all(r["success"] and r["data"]["provider"] == "backup" for r in results)
    # Two failures opened the circuit; after that no worker sent anything to the primary.
    assert len(primary.requests) == 2
    assert len(backup.requests) == 9
    ran_on = [w for w in (first, second) if "ai.generate" in w.log() and "succeeded" in w.log()]
    assert len(ran_on) == 2, "both workers should have taken jobs while the circuit was open"


@pytest.mark.faults
def test_open_circuit_without_fallback_defers_without_spending_retries(
    submitter, tmp_path, redis_client
):
    factory = WorkerFactory(tmp_path)
    with FakeLLMServer() as server:
        server.script(Reply.server_error(500))
        env = ai_env(
            server,
            CONVEYOR_BREAKER_FAIL_MAX="1",
            CONVEYOR_BREAKER_RESET="1.5",
            CONVEYOR_MAX_RETRIES="1",
        )
        try:
            factory.start("ai", env=env)
            job = submitter.submit("ai.generate", {"prompt": "hi"})
            envelope = job.result(timeout=30)
        finally:
            factory.stop_all()
    assert envelope["success"] is True, envelope  # one retry was enough: deferrals are free
    data = [e["data"] for e in events_of(redis_client, job.id)]
    assert any(d.get("deferred") for d in data), data
    assert len(server.requests) == 2  # the failure, then the probe that closed the circuit


def test_rate_limit_is_shared_by_every_worker(submitter, tmp_path, redis_client):
    factory = WorkerFactory(tmp_path)
    with FakeLLMServer() as server:
        env = ai_env(server, LLM_RPM="2", CONVEYOR_RATE_LIMIT_WAIT="0")
        factory.start("ai", env=env)
        factory.start("ai", env=env)
        jobs = submitter.submit_many("ai.generate", [{"prompt": f"p{i}"} for i in range(4)])

        def deferred(job) -> bool:
            return any(e["data"].get("deferred") for e in events_of(redis_client, job.id))

        done = wait_for(
            lambda: (
                sum(j.status() == "SUCCESS" for j in jobs) == 2
                and sum(deferred(j) for j in jobs) == 2
            ),
            timeout=30,
            what="two jobs done, two deferred",
        )
        assert done
        time.sleep(1.0)
        assert len(server.requests) == 2  # both workers together kept to 2 a minute
        waits = [
            e["data"]["next_attempt_in_s"]
            for j in jobs
            for e in events_of(redis_client, j.id)
            if e["data"].get("deferred")
        ]
        assert all(w > 15 for w in waits), waits
        for job in jobs:
            submitter.cancel(job.id)
        factory.stop_all()
