"""The gateway over real HTTP: a real ``conveyor gateway`` process, real Redis and Postgres,
real workers. Every answer is the envelope; every error names what is wrong."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from conveyor import keys
from conveyor.names import queue_for
from conveyor.submitter import _digest
from tests.support import queues

pytestmark = pytest.mark.timeout(120)


def _post(gateway, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=30, **kwargs)


def _envelope(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"success", "data", "error", "timestamp", "request_id"}, body
    assert body["success"] is (response.status_code < 400), body
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def _wait_result(gateway, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = _envelope(httpx.get(f"{gateway.url}/api/v1/jobs/{job_id}"))["data"]
        if view["result"] is not None:
            return view
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {view}")


def test_a_job_submitted_over_http_runs_and_its_result_is_read_back(gateway, ping_worker):
    response = _post(
        gateway,
        "/api/v1/jobs",
        {"task": "maintenance.ping", "payload": {"message": "over http"}},
        headers={"X-Request-ID": "req-abc-1"},
    )
    assert response.status_code == 202, response.text
    body = _envelope(response)
    assert body["request_id"] == "req-abc-1"
    job = body["data"]
    assert job["status"] == "queued" and job["duplicate"] is False
    assert response.headers["location"] == f"/api/v1/jobs/{job['job_id']}"
    view = _wait_result(gateway, job["job_id"])
    assert view["status"] == "succeeded"
    assert view["result"]["success"] is True
    assert view["result"]["data"]["pong"] == "over http"
    assert view["request_id"] == "req-abc-1"
    listed = _envelope(httpx.get(f"{gateway.url}/api/v1/jobs", params={"task": "maintenance.ping"}))
    assert job["job_id"] in [j["job_id"] for j in listed["data"]["jobs"]]
    done = httpx.get(f"{gateway.url}/api/v1/jobs", params={"status": "succeeded", "limit": 500})
    assert job["job_id"] in [j["job_id"] for j in _envelope(done)["data"]["jobs"]]


def test_each_family_route_enqueues_its_task(gateway, redis_client):
    cases = {
        "/api/v1/ai/generate": ("ai.generate", {"prompt": "hi"}),
        "/api/v1/ai/chat": ("ai.chat", {"messages": [{"role": "user", "content": "hi"}]}),
        "/api/v1/ai/code": ("ai.code", {"instruction": "add a test"}),
        "/api/v1/ai/analyze": ("ai.analyze", {"text": "great", "kind": "sentiment"}),
        "/api/v1/db/logs": ("episodes.record", {"user_id": "u", "model_type": "t", "prompt": "p"}),
    }
    for path, (task, payload) in cases.items():
        response = _post(gateway, path, payload)
        assert response.status_code == 202, (path, response.text)
        job_id = _envelope(response)["data"]["job_id"]
        entry = json.loads(redis_client.get(keys.job(job_id)))
        assert entry["task"] == task, path
        queued = queues.messages(redis_client, queue_for(task))
        assert job_id in [m["headers"]["id"] for m in queued], path
    # No worker of ours runs these: leave nothing for another module's workers.
    queues.purge(redis_client, "ai", "episodes")


def test_bad_payloads_name_every_bad_field_and_enqueue_nothing(gateway, redis_client):
    before = redis_client.llen("ai")
    response = _post(gateway, "/api/v1/ai/chat", {"messages": [{"role": "bot"}], "temperature": 9})
    assert response.status_code == 400
    body = _envelope(response)
    problems = " | ".join(body["data"]["problems"])
    assert "messages.0.role" in problems and "messages.0.content" in problems, problems
    assert "temperature" in problems, problems
    assert redis_client.llen("ai") == before

    for raw, expected in (
        (b"not json", "not JSON"),
        (b"", "empty"),
        (b'{"prompt": "x", "temperature": NaN}', "temperature: input should be a finite"),
        (b"[" * 5000 + b"]" * 5000, "deep"),
    ):
        response = httpx.post(f"{gateway.url}/api/v1/ai/generate", content=raw, timeout=30)
        assert response.status_code == 400, (raw[:20], response.text)
        assert expected.lower() in response.text.lower(), response.text

    unknown = _post(gateway, "/api/v1/jobs", {"task": "no.such", "payload": {}})
    assert unknown.status_code == 400 and "unknown task" in unknown.text
    not_json = httpx.post(
        f"{gateway.url}/api/v1/jobs", content=b"task=x", headers={"content-type": "text/plain"}
    )
    assert not_json.status_code == 400 and "Content-Type" in not_json.text


def test_idempotency_key_same_body_same_job_other_body_422(gateway, redis_client):
    key = f"order-{uuid.uuid4().hex}"
    body = {"task": "maintenance.ping", "payload": {"message": "once"}}
    first = _envelope(_post(gateway, "/api/v1/jobs", body, headers={"Idempotency-Key": key}))
    again = _post(gateway, "/api/v1/jobs", body, headers={"Idempotency-Key": key})
    assert again.status_code == 202
    assert _envelope(again)["data"]["job_id"] == first["data"]["job_id"]
    assert _envelope(again)["data"]["duplicate"] is True
    other = _post(
        gateway,
        "/api/v1/jobs",
        {"task": "maintenance.ping", "payload": {"message": "another ask"}},
        headers={"Idempotency-Key": key},
    )
    assert other.status_code == 422, other.text
    other_task = _post(
        gateway, "/api/v1/ai/generate", {"prompt": "x"}, headers={"Idempotency-Key": key}
    )
    assert other_task.status_code == 422, other_task.text
    # A key whose first request is still being sent (claimed, pending): 409, retry later.
    pending = f"pending-{uuid.uuid4().hex}"
    digest = _digest("maintenance.ping", body["payload"])
    redis_client.set(keys.idempotency(None, pending), f"some-job|{digest}|pending", ex=30)
    busy = _post(gateway, "/api/v1/jobs", body, headers={"Idempotency-Key": pending})
    assert busy.status_code == 409 and "retry-after" in busy.headers, busy.text


def test_a_batch_is_all_or_nothing_and_keeps_its_order(gateway, redis_client):
    good = [{"task": "maintenance.ping", "payload": {"message": f"m{i}"}} for i in range(3)]
    bad = [*good, {"task": "ai.chat", "payload": {"messages": []}}, {"task": "nope", "payload": {}}]
    before = redis_client.zcard(keys.tenant_jobs(None))
    refused = _post(gateway, "/api/v1/jobs/batch", {"jobs": bad})
    assert refused.status_code == 400
    problems = _envelope(refused)["data"]["problems"]
    assert any("jobs.3.payload" in p for p in problems)
    assert any("jobs.4.task" in p for p in problems)
    assert redis_client.zcard(keys.tenant_jobs(None)) == before

    mixed = [*good, {"task": "ai.generate", "payload": {"prompt": "p"}}]
    response = _post(gateway, "/api/v1/jobs/batch", {"jobs": mixed})
    assert response.status_code == 202, response.text
    jobs = _envelope(response)["data"]["jobs"]
    assert [j["task"] for j in jobs] == ["maintenance.ping"] * 3 + ["ai.generate"]
    assert len({j["job_id"] for j in jobs}) == 4
    queues.purge(redis_client, "ai")


def test_cancel_a_queued_job_then_409_once_it_ended(gateway):
    job_id = _envelope(
        _post(gateway, "/api/v1/jobs", {"task": "maintenance.ping", "payload": {}, "delay_s": 60})
    )["data"]["job_id"]
    response = httpx.delete(f"{gateway.url}/api/v1/jobs/{job_id}")
    assert response.status_code == 202 and _envelope(response)["data"]["cancel"] == "not started"
    missing = httpx.delete(f"{gateway.url}/api/v1/jobs/{uuid.uuid4()}")
    assert missing.status_code == 404


def test_unknown_ids_routes_and_oversized_bodies(gateway):
    assert httpx.get(f"{gateway.url}/api/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert httpx.get(f"{gateway.url}/api/v1/nothing").status_code == 404
    assert _envelope(httpx.get(f"{gateway.url}/api/v1/nothing"))["error"].startswith("no route")
    huge = b'{"prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    response = httpx.post(f"{gateway.url}/api/v1/ai/generate", content=huge, timeout=60)
    assert response.status_code == 413, response.text[:300]
    over_payload = _post(gateway, "/api/v1/ai/generate", {"prompt": "x" * 300_000})
    assert over_payload.status_code == 400 and "over the limit" in over_payload.text
    assert httpx.get(f"{gateway.url}/api/v1/jobs", params={"status": "weird"}).status_code == 400
    assert httpx.get(f"{gateway.url}/api/v1/jobs", params={"since": "yesterday"}).status_code == 400


def test_health_ready_openapi_and_the_page(gateway):
    assert _envelope(httpx.get(f"{gateway.url}/health"))["data"] == {"status": "ok"}
    assert _envelope(httpx.get(f"{gateway.url}/ready"))["data"] == {"status": "ready"}
    document = httpx.get(f"{gateway.url}/openapi.json").json()
    assert "/api/v1/jobs/{job_id}/events" in document["paths"]
    assert "ChatPayload" in document["components"]["schemas"]
    page = httpx.get(f"{gateway.url}/ui/")
    assert page.status_code == 200 and "<html" in page.text.lower()
