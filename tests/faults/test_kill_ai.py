"""An ai worker SIGKILLed in the middle of its streams: every job comes back (Redis' visibility
timeout), runs to its end on another worker, and records one episode."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.fakes.llm_server import FakeLLMServer, Reply
from tests.support import faults
from tests.support.ai import ai_env, events_of, fresh_upstream_state  # noqa: F401
from tests.support.waiting import wait_for
from tests.support.workers import FAST_REDELIVERY, WorkerFactory

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("fresh_upstream_state")]

JOBS = 6


def _episodes(engine, job_ids: list[str]) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT job_id, count(*) FROM episodic_logs WHERE job_id = ANY(:ids) GROUP BY 1"),
            {"ids": job_ids},
        ).all()
    return {job_id: n for job_id, n in rows}


def test_sigkill_mid_stream_every_job_completes_elsewhere_with_one_episode(
    submitter, engine, redis_client, tmp_path
):
    factory = WorkerFactory(tmp_path)
    # 2 s an answer: well inside FAST_REDELIVERY's 4 s soft limit for the ai pool.
    slow = Reply.ok(chunks=tuple(f"w{i} " for i in range(20)), chunk_delay_s=0.1)
    with FakeLLMServer(default=slow) as server:
        env = ai_env(server, **FAST_REDELIVERY, CONVEYOR_AI_CONCURRENCY="8")
        try:
            factory.start("episodes")
            first = factory.start("ai", env=env)
            jobs = submitter.submit_many(
                "ai.generate", [{"prompt": f"p{i}", "user_id": "u-kill"} for i in range(JOBS)]
            )
            wait_for(
                lambda: all(
                    any(
                        e["event"] == "ai_generation_progress"
                        for e in events_of(redis_client, j.id)
                    )
                    for j in jobs
                ),
                timeout=30,
                what="every stream under way",
            )
            first.kill()  # SIGKILL, mid-stream: no ack, no goodbye
            first.process.wait(10)
            factory.start("ai", env=env)
            envelopes = [job.result(timeout=90) for job in jobs]
            ids = [j.id for j in jobs]
            episodes = wait_for(
                lambda: (e := _episodes(engine, ids)) and len(e) == JOBS and e,
                timeout=30,
                what="one episode per job",
            )
        finally:
            factory.stop_all()
    counts = faults.report(
        "SIGKILL ai worker mid-stream",
        submitted=JOBS,
        completed=sum(e["success"] for e in envelopes),
        lost=sum(not e["success"] for e in envelopes),
        duplicated=sum(n - 1 for n in episodes.values()),
        dead_lettered=0,
        note=f"{len(server.requests)} upstream calls (each job asked again once)",
    )
    assert (counts.completed, counts.lost, counts.duplicated) == (JOBS, 0, 0)
    assert len(server.requests) == 2 * JOBS
