"""API keys, tenants, tokens and the per-key rate limit, against a real gateway in production
mode: a tenant sees only its own jobs, events, episodes and dead letters (another's id is 404);
a burst past a key's limit gets 429s with Retry-After and enqueues nothing for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conveyor import keys
from tests.gateway.conftest import RATE_LIMIT
from tests.support import queues
from tests.support.sse import read_all
from workers.store import dead_letters

pytestmark = pytest.mark.timeout(120)


def _submit(gateway, tenant: str, **extra) -> dict:
    response = httpx.post(
        f"{gateway.url}/api/v1/jobs",
        json={"task": "maintenance.ping", "payload": {"message": tenant}, **extra},
        headers=gateway.for_tenant(tenant),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()["data"]


def test_no_key_or_a_wrong_key_is_401_with_a_challenge(keyed_gateway):
    for headers in ({}, {"Authorization": "Bearer cvk_nope"}, {"X-API-Key": "nope"}):
        response = httpx.get(f"{keyed_gateway.url}/api/v1/jobs", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "cvk_nope" not in response.text  # a presented key is never echoed
    by_header = httpx.get(
        f"{keyed_gateway.url}/api/v1/jobs", headers={"X-API-Key": keyed_gateway_key("acme")}
    )
    assert by_header.status_code == 200
    assert httpx.get(f"{keyed_gateway.url}/health").status_code == 200  # no key needed


def keyed_gateway_key(tenant: str) -> str:
    from tests.gateway.conftest import KEYS

    return KEYS[tenant]


def test_a_tenant_never_sees_another_tenants_job(keyed_gateway, ping_worker):
    job = _submit(keyed_gateway, "acme")
    job_id = job["job_id"]
    acme, globex = keyed_gateway.for_tenant("acme"), keyed_gateway.for_tenant("globex")
    url = f"{keyed_gateway.url}/api/v1/jobs/{job_id}"
    assert httpx.get(url, headers=acme).status_code == 200
    unknown = httpx.get(f"{keyed_gateway.url}/api/v1/jobs/{uuid.uuid4()}", headers=globex)
    theirs = httpx.get(url, headers=globex)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"].replace(job_id, "X") == unknown.json()["error"].replace(
        unknown.url.path.rsplit("/", 1)[-1], "X"
    ), "another tenant's job must look exactly like one that does not exist"
    assert httpx.delete(url, headers=globex).status_code == 404
    assert httpx.get(f"{url}/events", headers=globex).status_code == 404
    assert httpx.post(f"{url}/token", headers=globex).status_code == 404
    listed = httpx.get(f"{keyed_gateway.url}/api/v1/jobs", headers=globex).json()["data"]["jobs"]
    assert job_id not in [j["job_id"] for j in listed]
    # Over a WebSocket: a subscription to another's job is refused; their firehose is silent.
    ws_url = keyed_gateway.url.replace("http", "ws", 1) + "/api/v1/ws"
    # A key in a URL is refused (URLs are logged); a WebSocket client sends it as a header.
    with pytest.raises(InvalidStatus), connect(f"{ws_url}?api_key={keyed_gateway_key('globex')}"):
        pass
    globex_header = {"Authorization": f"Bearer {keyed_gateway_key('globex')}"}
    with connect(ws_url, additional_headers=globex_header, open_timeout=10) as ws:
        ws.send(json.dumps({"op": "subscribe", "component": "*"}))
        assert json.loads(ws.recv(10))["control"] == "subscribed"
        ws.send(json.dumps({"op": "subscribe", "job_id": job_id}))
        assert json.loads(ws.recv(10)) == {"control": "problem", "error": f"no job {job_id}"}
        other = _submit(keyed_gateway, "acme", payload={"message": "acme", "hold_s": 1})
        mine = _submit(keyed_gateway, "globex")
        seen = []
        while not (
            seen and seen[-1]["type"] == "complete" and seen[-1]["job_id"] == mine["job_id"]
        ):
            seen.append(json.loads(ws.recv(30)))
        assert all(e["job_id"] == mine["job_id"] for e in seen), "another tenant's events leaked"
        assert other["job_id"] not in {e["job_id"] for e in seen}


def test_a_job_token_follows_that_one_job_without_a_key(keyed_gateway, ping_worker):
    job = _submit(keyed_gateway, "acme", payload={"message": "t", "hold_s": 1})
    url = f"{keyed_gateway.url}/api/v1/jobs/{job['job_id']}/events"
    events = read_all(f"{url}?token={job['events_token']}")
    assert events[-1].data["type"] == "complete"
    other = _submit(keyed_gateway, "acme")
    elsewhere = f"{keyed_gateway.url}/api/v1/jobs/{other['job_id']}/events"
    assert httpx.get(f"{elsewhere}?token={job['events_token']}").status_code == 403
    forged = job["events_token"][:-2] + ("AA" if not job["events_token"].endswith("AA") else "BB")
    assert httpx.get(f"{url}?token={forged}").status_code == 401
    # A token reads events only: not the job, not the list.
    assert (
        httpx.get(f"{keyed_gateway.url}/api/v1/jobs?token={job['events_token']}").status_code == 401
    )


def test_episodes_and_dead_letters_are_the_tenants_own(
    keyed_gateway, workers, engine, redis_client, unique
):
    workers.start("episodes")
    acme, globex = keyed_gateway.for_tenant("acme"), keyed_gateway.for_tenant("globex")
    episode = {"user_id": f"u-{unique}", "model_type": "m", "prompt": f"hello {unique}"}
    response = httpx.post(f"{keyed_gateway.url}/api/v1/db/logs", json=episode, headers=acme)
    assert response.status_code == 202, response.text
    params = {"user_id": f"u-{unique}"}
    deadline = time.monotonic() + 30
    found: list = []
    while not found and time.monotonic() < deadline:
        found = httpx.get(
            f"{keyed_gateway.url}/api/v1/db/logs", params=params, headers=acme
        ).json()["data"]["episodes"]
        time.sleep(0.2)
    assert [e["prompt"] for e in found] == [f"hello {unique}"]
    theirs = httpx.get(f"{keyed_gateway.url}/api/v1/db/logs", params=params, headers=globex)
    assert theirs.json()["data"]["episodes"] == []

    job_id = f"dl-{unique}"
    dead_letters.record(
        engine,
        redis_client,
        {
            "job_id": job_id,
            "task": "maintenance.ping",
            "queue": "maintenance",
            "payload": {"message": "again"},
            "reason": "permanent",
            "error": "boom",
            "attempts": 1,
            "tenant": "acme",
        },
    )
    mine = httpx.get(f"{keyed_gateway.url}/api/v1/dead-letters/{job_id}", headers=acme)
    assert mine.status_code == 200 and mine.json()["data"]["payload"] == {"message": "again"}
    assert (
        httpx.get(f"{keyed_gateway.url}/api/v1/dead-letters/{job_id}", headers=globex).status_code
        == 404
    )
    listed = httpx.get(f"{keyed_gateway.url}/api/v1/dead-letters", headers=globex).json()
    assert job_id not in [d["job_id"] for d in listed["data"]["dead_letters"]]
    retry = httpx.post(
        f"{keyed_gateway.url}/api/v1/dead-letters/retry", json={"job_id": job_id}, headers=globex
    )
    assert retry.status_code == 404
    retried = httpx.post(
        f"{keyed_gateway.url}/api/v1/dead-letters/retry", json={"job_id": job_id}, headers=acme
    )
    assert retried.status_code == 200, retried.text
    [entry] = retried.json()["data"]["retried"]
    new = httpx.get(f"{keyed_gateway.url}/api/v1/jobs/{entry['job_id']}", headers=acme).json()
    assert new["data"]["retry_of"] == job_id
    again = httpx.post(
        f"{keyed_gateway.url}/api/v1/dead-letters/retry", json={"job_id": job_id}, headers=acme
    )
    assert again.status_code == 409
    queues.purge(redis_client, "maintenance")  # the new job: no worker of this test runs it


def test_a_burst_past_the_keys_limit_gets_429s_and_enqueues_nothing_for_them(
    keyed_gateway, redis_client
):
    limit = int(RATE_LIMIT.split("/")[0])
    headers = keyed_gateway.for_tenant("burst")
    body = {"task": "maintenance.ping", "payload": {"message": "burst"}, "delay_s": 1}

    def post(_: int) -> httpx.Response:
        return httpx.post(
            f"{keyed_gateway.url}/api/v1/jobs", json=body, headers=headers, timeout=30
        )

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(limit + 15)))
    codes = [r.status_code for r in responses]
    assert codes.count(202) == limit and codes.count(429) == 15, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "rate limit" in refused.json()["error"]
    assert redis_client.zcard(keys.tenant_jobs("burst")) == limit
    queues.purge(redis_client, "maintenance")
    # Other keys have their own budget.
    assert _submit(keyed_gateway, "globex")["status"] == "queued"


def test_outside_dev_mode_the_gateway_will_not_start_without_keys_or_secret(tmp_path):
    for missing, env in (
        ("CONVEYOR_GATEWAY_KEYS", {"CONVEYOR_GATEWAY_KEYS": ""}),
        (
            "CONVEYOR_GATEWAY_SECRET",
            {"CONVEYOR_GATEWAY_KEYS": f"a:{'0' * 64}", "CONVEYOR_GATEWAY_SECRET": ""},
        ),
        ("CONVEYOR_GATEWAY_KEYS", {"CONVEYOR_GATEWAY_KEYS": "acme:cvk_the_key_itself"}),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "workers.cli", "gateway", "--port=1"],
            env={**os.environ, "CONVEYOR_ENV": "prod", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 78, result.stderr
        assert missing in result.stderr
        assert "cvk_the_key_itself" not in result.stderr


def test_a_tenant_may_not_send_the_operators_housekeeping(keyed_gateway, redis_client):
    """Retention, reconciliation and the dead-letter flush act on every tenant's rows: a
    tenant's request for one is refused and nothing is enqueued."""
    before = redis_client.zcard(keys.tenant_jobs("acme"))
    for task, payload in (
        ("maintenance.episode_retention", {"days": 1}),
        ("maintenance.flush_dead_letters", {}),
        ("maintenance.reconcile_workflows", {}),
    ):
        response = httpx.post(
            f"{keyed_gateway.url}/api/v1/jobs",
            json={"task": task, "payload": payload},
            headers=keyed_gateway.for_tenant("acme"),
        )
        assert response.status_code == 403, response.text
        assert "operator" in response.json()["error"]
    batch = httpx.post(
        f"{keyed_gateway.url}/api/v1/jobs/batch",
        json={"jobs": [{"task": "maintenance.episode_retention", "payload": {"days": 1}}]},
        headers=keyed_gateway.for_tenant("acme"),
    )
    assert batch.status_code == 403
    assert redis_client.zcard(keys.tenant_jobs("acme")) == before


def test_odd_tokens_and_event_ids_are_refused_not_crashed(keyed_gateway, ping_worker):
    job = _submit(keyed_gateway, "acme")
    url = f"{keyed_gateway.url}/api/v1/jobs/{job['job_id']}/events"
    for token in ("a.%C3%A9", "%C3%A9.%C3%A9", "%ED%B3%BF.x", "."):
        assert httpx.get(f"{url}?token={token}").status_code == 401, token
    superscript_two = "²".encode("latin-1")  # str.isdigit() says yes, int() says no
    odd = httpx.get(
        url, headers={**keyed_gateway.for_tenant("acme"), "Last-Event-ID": superscript_two}
    )
    assert odd.status_code == 400
