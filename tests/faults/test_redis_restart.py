"""Redis (the embedded Valkey, append-only file fsynced every second) SIGKILLed and restarted
while jobs are queued and running: nothing that reached Redis more than a second before the
kill is lost, and no effect is doubled.

The loss window, honestly: with ``appendfsync everysec`` the last second of writes before a
crash may be gone: a job submitted in that second may vanish with them, and a job that finished
in it may run again (its ack and result lost together; its effects are idempotent). So jobs are
all submitted, then the test waits past that second before the kill.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from conveyor import Submitter
from conveyor.config import ClientConfig
from tests.support import faults
from tests.support.waiting import wait_for
from tests.support.workers import FAST_REDELIVERY
from workers.dev.embedded import EmbeddedRedis

pytestmark = pytest.mark.faults

PINGS = 60
EPISODES = 300


def _written(engine, model: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT episode_id, count(*) FROM episodic_logs WHERE model_type = :m GROUP BY 1"),
            {"m": model},
        ).all()
    return {episode_id: n for episode_id, n in rows}


def test_redis_killed_and_restarted_loses_nothing_settled_and_doubles_nothing(
    workers, engine, tmp_path: Path
):
    data = tmp_path / "valkey"
    valkey = EmbeddedRedis(data, persist=True)
    url = valkey.start()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    # Time limits well above the outage: a job blocked on a dead broker longer than its hard
    # limit is killed and dead-lettered as a timeout, as it would be in production.
    env = {
        **FAST_REDELIVERY,
        "CONVEYOR_VISIBILITY_TIMEOUT": "40",
        "CONVEYOR_MAINTENANCE_TIME_LIMIT": "30",
        "CONVEYOR_EPISODES_TIME_LIMIT": "30",
        "REDIS_URL": url,
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "CONVEYOR_RETRY_BASE": "0.2",
    }
    submitter = Submitter(ClientConfig(redis_url=url, visibility_timeout_s=40))
    restarted: EmbeddedRedis | None = None
    try:
        started = [
            workers.start("maintenance", env={**env, "CONVEYOR_MAINTENANCE_CONCURRENCY": "2"}),
            workers.start("episodes", env=env),
        ]
        model = f"fault-{uuid.uuid4().hex[:8]}"
        pings = [
            submitter.submit("maintenance.ping", {"message": f"p{n}", "hold_s": 0.2})
            for n in range(PINGS)
        ]
        records = submitter.submit_many(
            "episodes.record", [{"user_id": "u", "model_type": model} for _ in range(EPISODES)]
        )
        time.sleep(1.5)  # past the AOF's one-second window: everything above is on disk

        os.kill(valkey.pid or 0, signal.SIGKILL)
        time.sleep(2.0)  # workers lose the broker mid-job
        restarted = EmbeddedRedis(data, port=port, persist=True)
        assert restarted.start() == url

        def finished() -> list[dict]:
            envelopes = []
            for job in pings:
                try:
                    envelopes.append(job.result(timeout=0.05))
                except TimeoutError:
                    return []
            return envelopes

        envelopes = wait_for(finished, timeout=120, interval=1.0, what="every ping's result")
        written = wait_for(
            lambda: (w := _written(engine, model)) and len(w) == EPISODES and w,
            timeout=120,
            interval=1.0,
            what="every episode",
        )
        completed = sum(e["success"] for e in envelopes) + len(written)
        duplicated = sum(n - 1 for n in written.values())
        counts = faults.report(
            "redis SIGKILL + restart (AOF everysec), pings + episodes",
            submitted=PINGS + EPISODES,
            completed=completed,
            lost=PINGS + EPISODES - completed,
            duplicated=duplicated,
            dead_lettered=sum(not e["success"] for e in envelopes),
            note=f"{len(records)} episodes, {PINGS} pings",
        )
        failures = [e["error"] for e in envelopes if not e["success"]]
        # No worker stopped over it (kombu's close of the lost connection used to stop one).
        assert [w.process.poll() for w in started] == [None, None]
        assert counts.lost == 0 and counts.duplicated == 0 and counts.dead_lettered == 0, failures
    finally:
        submitter.close()
        workers.stop_all()
        for server in (restarted, valkey):
            if server is not None:
                server.stop()
