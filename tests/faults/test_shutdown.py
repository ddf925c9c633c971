"""SIGTERM to a worker under load (a deploy, a scale-down): the jobs it is running finish
within the grace, the ones it holds but has not started go back to the queue, and another
worker runs them. Nothing is lost; nothing runs twice."""

from __future__ import annotations

import json
import os
import signal

import pytest

from conveyor import keys
from tests.support import faults
from tests.support.waiting import wait_for

pytestmark = pytest.mark.faults

JOBS = 12
HOLD_S = 1.5


def _starts(redis_client, job_id: str) -> int:
    entries = redis_client.xrange(keys.events_stream(job_id))
    events = [json.loads(fields[b"event"]) for _, fields in entries]
    return sum(e["event"] == "maintenance_start" for e in events)


def test_sigterm_under_load_finishes_what_runs_and_gives_back_the_rest(
    workers, submitter, redis_client
):
    env = {"CONVEYOR_MAINTENANCE_CONCURRENCY": "2", "CONVEYOR_MAINTENANCE_PREFETCH": "2"}
    first = workers.start("maintenance", env=env)
    jobs = [
        submitter.submit("maintenance.ping", {"message": f"j{n}", "hold_s": HOLD_S})
        for n in range(JOBS)
    ]
    wait_for(
        lambda: sum(_starts(redis_client, j.id) for j in jobs) >= 2,
        timeout=30,
        what="two jobs running",
    )
    # Warm shutdown, as Kubernetes and systemd (KillMode=mixed) send it: to the main process
    # only. (SIGTERM to the whole process group also reaches the pool's children, which die
    # mid-job: their jobs then run again.)
    os.kill(first.pid, signal.SIGTERM)
    first.process.wait(30)
    finished_by_first = [j for j in jobs if j.status() == "SUCCESS"]

    second = workers.start("maintenance", env=env)
    envelopes = [j.result(timeout=120) for j in jobs]
    runs = [_starts(redis_client, j.id) for j in jobs]
    counts = faults.report(
        "SIGTERM under load (maintenance, prefork)",
        submitted=JOBS,
        completed=sum(e["success"] for e in envelopes),
        lost=sum(not e["success"] for e in envelopes),
        duplicated=sum(n - 1 for n in runs if n > 1),
        dead_lettered=0,
        note=f"{len(finished_by_first)} finished during the grace",
    )
    assert first.process.returncode == 0
    assert len(finished_by_first) >= 2  # what was running finished, not cut
    assert (counts.completed, counts.lost, counts.duplicated) == (JOBS, 0, 0), runs
    workers_of = {e["data"]["worker"] for e in envelopes}
    assert second.hostname in workers_of  # the rest went back and ran elsewhere
