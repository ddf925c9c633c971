"""An LLM provider in a storm of 500s, 429s and stalls, under two workers' load: the shared
circuit opens and bounds what the fleet sends it; jobs wait (deferred, no retry spent) instead
of failing; when the provider heals, every job completes, each once."""

from __future__ import annotations

import time

import pytest

from tests.fakes.llm_server import FakeLLMServer, Reply
from tests.support import faults
from tests.support.ai import ai_env, fresh_upstream_state  # noqa: F401
from tests.support.workers import WorkerFactory

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("fresh_upstream_state")]

JOBS = 20
STORM_S = 5.0
FAIL_MAX = 3
RESET_S = 2.0
SLOTS = 2 * 2  # two workers of two threads


def test_a_storm_opens_the_circuit_bounds_the_calls_and_every_job_completes_after(
    submitter, tmp_path
):
    factory = WorkerFactory(tmp_path)
    storm = [Reply.server_error(500), Reply.http_error(429, "slow down"), Reply.stall(3.0)]
    with FakeLLMServer(default=Reply.server_error(503)) as server:
        server.script(*(storm * 10))
        env = ai_env(
            server,
            LLM_READ_TIMEOUT="1",
            CONVEYOR_BREAKER_FAIL_MAX=str(FAIL_MAX),
            CONVEYOR_BREAKER_RESET=str(RESET_S),
            CONVEYOR_MAX_RETRIES="8",
            CONVEYOR_RETRY_BASE="0.2",
            CONVEYOR_RETRY_CAP="1",
            CONVEYOR_AI_CONCURRENCY="2",
        )
        try:
            factory.start("ai", env=env)
            factory.start("ai", env=env)
            jobs = submitter.submit_many("ai.generate", [{"prompt": f"p{i}"} for i in range(JOBS)])
            time.sleep(STORM_S)
            during = len(server.requests)
            server.default = Reply.ok("healed")
            while server._script:  # the rest of the storm never comes
                server.next_reply()
            envelopes = [job.result(timeout=120) for job in jobs]
        finally:
            factory.stop_all()
        healed_calls = len(server.requests) - during
    # While the circuit is open, one probe per reset period goes through; before it opened,
    # at most every slot had a call in flight.
    bound = FAIL_MAX + SLOTS + int(STORM_S / RESET_S + 1) * SLOTS
    counts = faults.report(
        "LLM storm of 500/429/stalls, 2 workers, then healed",
        submitted=JOBS,
        completed=sum(e["success"] for e in envelopes),
        lost=sum(not e["success"] for e in envelopes),
        duplicated=max(0, healed_calls - JOBS),
        dead_lettered=sum(not e["success"] for e in envelopes),
        note=f"{during} upstream calls in {STORM_S:g} s of storm (bound {bound})",
    )
    assert during <= bound, during
    assert counts.completed == JOBS, [e["error"] for e in envelopes if not e["success"]]
    assert all(e["data"]["content"] == "healed" for e in envelopes)
    assert healed_calls == JOBS  # one answer per job: none asked twice
