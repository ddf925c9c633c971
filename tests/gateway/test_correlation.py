"""A request's id and trace travel with its job: from the gateway into the message headers, the
job index, its events, its result envelope, its worker's log and its dead letter (with the
tenant that asked)."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from conveyor import jobindex, keys
from tests.support.waiting import wait_for
from workers.store import dead_letters

pytestmark = pytest.mark.timeout(120)


def test_request_id_and_traceparent_reach_events_result_log_and_dead_letter(
    keyed_gateway, workers, engine, redis_client
):
    # No n8n configured: the job fails for good at once, so every place it reaches is seen.
    worker = workers.start("n8n", env={"N8N_BASE_URL": "", "N8N_WORKFLOWS": ""})
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    trace = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    response = httpx.post(
        f"{keyed_gateway.url}/api/v1/workflow/execute",
        json={"workflow": "orders"},
        headers={
            **keyed_gateway.for_tenant("acme"),
            "X-Request-ID": request_id,
            "traceparent": trace,
        },
        timeout=30,
    )
    assert response.status_code == 202, response.text
    assert response.headers["x-request-id"] == request_id
    job_id = response.json()["data"]["job_id"]

    [entry] = jobindex.lookup(redis_client, [job_id])
    assert (entry.tenant, entry.request_id, entry.traceparent) == ("acme", request_id, trace)

    row = wait_for(
        lambda: dead_letters.get_dead_letter(engine, job_id, tenant="acme"),
        timeout=30,
        what="the dead letter",
    )
    assert (row["tenant"], row["request_id"], row["traceparent"]) == ("acme", request_id, trace)
    assert "n8n is not configured" in row["error"]

    events = [
        json.loads(fields[b"event"])
        for _, fields in redis_client.xrange(keys.events_stream(job_id))
    ]
    assert events and all(e["request_id"] == request_id for e in events)
    assert events[-1]["type"] == "error"

    view = httpx.get(
        f"{keyed_gateway.url}/api/v1/jobs/{job_id}", headers=keyed_gateway.for_tenant("acme")
    ).json()["data"]
    assert view["status"] == "failed"
    assert view["result"]["success"] is False and view["result"]["request_id"] == request_id
    worker.wait_for_log(f"[request {request_id}]")

    # A trace that is not W3C's is replaced by a new one, not carried as it came.
    bad = httpx.post(
        f"{keyed_gateway.url}/api/v1/workflow/execute",
        json={"workflow": "orders"},
        headers={**keyed_gateway.for_tenant("acme"), "traceparent": "not-a-trace"},
        timeout=30,
    )
    [other] = jobindex.lookup(redis_client, [bad.json()["data"]["job_id"]])
    assert other.traceparent != "not-a-trace" and other.traceparent.startswith("00-")
