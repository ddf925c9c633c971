"""`conveyor status|result|events|jobs`, the operator's twins of the gateway's job routes, run as
real processes against real Redis and a real worker."""

from __future__ import annotations

import json
import uuid

from conveyor.jobindex import Origin
from tests.cli.test_commands import _conveyor


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_status_result_events_and_jobs_of_a_finished_job(workers, submitter, unique):
    workers.start("maintenance")
    tenant = f"t-{unique}"
    job = submitter.submit(
        "maintenance.ping",
        {"message": "cli", "hold_s": 1},
        origin=Origin(tenant=tenant, request_id=f"req-{unique}"),
    )
    waited = _conveyor("result", job.id, "--wait", "--timeout", "30")
    assert waited.returncode == 0, waited.stderr
    envelope = json.loads(waited.stdout)
    assert envelope["success"] is True and envelope["request_id"] == f"req-{unique}"

    status = _conveyor("status", job.id)
    assert status.returncode == 0
    view = json.loads(status.stdout)
    assert (view["status"], view["task"], view["tenant"]) == (
        "succeeded",
        "maintenance.ping",
        tenant,
    )

    events = _conveyor("events", job.id)
    assert events.returncode == 0
    seqs = [e["seq"] for e in _lines(events.stdout)]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3
    resumed = _conveyor("events", job.id, "--from-seq", "2")
    assert [e["seq"] for e in _lines(resumed.stdout)] == seqs[2:]

    mine = _lines(_conveyor("jobs", "--tenant", tenant).stdout)
    assert [j["job_id"] for j in mine] == [job.id]
    everyone = _lines(_conveyor("jobs", "--status", "succeeded", "--limit", "500").stdout)
    assert job.id in [j["job_id"] for j in everyone]
    assert _lines(_conveyor("jobs", "--tenant", tenant, "--status", "failed").stdout) == []


def test_unknown_jobs_and_bad_input_exit_with_their_codes():
    unknown = str(uuid.uuid4())
    assert _conveyor("status", unknown).returncode == 1
    assert _conveyor("result", unknown).returncode == 1
    assert _conveyor("events", unknown, "--timeout", "1").returncode == 3
    bad = _conveyor("jobs", "--status", "sideways")
    assert bad.returncode == 2 and "--status must be one of" in bad.stderr
    assert _conveyor("jobs", "--since", "yesterday").returncode == 2
