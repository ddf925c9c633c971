"""schemathesis against the running gateway: whatever a caller sends, no 500 and no answer
outside the OpenAPI document the gateway serves (its status codes, content types, headers and
envelope schemas; what the document calls invalid is refused).

Both gateway processes are fuzzed through their own ``/openapi.json``: the dev-mode one (no
keys: every route), and the keyed one, with acme's key and with none.

Left out, and why:
- ``GET /api/v1/ws``: a WebSocket, not in the OpenAPI document (test_events covers it).
- Submits on the keyed gateway with acme's key: each charges acme's small rate limit, which
  the keyed tests after this module share through Redis. (Without a key they are fuzzed: they
  answer 401 before charging anything; the dev gateway fuzzes their bodies.)
- The coverage phase for ``POST /api/v1/jobs`` and ``/jobs/batch``: with a variant per public
  task it would send thousands of requests; the fuzzing phase covers them.
Kept, with care:
- ``GET /api/v1/jobs/{id}/events``: a made-up id is never a real job, so it answers at once
  (404, 400, 401); the request timeout bounds it should it ever stream.
- ``DELETE /api/v1/dead-letters`` would purge, and ``POST /api/v1/dead-letters/retry`` with an
  empty filter would re-submit, other tests' dead letters (the operator sees every tenant's):
  both run with ``dry_run`` forced true.
- Submits enqueue real messages (no worker consumes them here): the module purges the queues
  after itself. Idempotency keys get this run's prefix, so no other test (or rerun) meets one.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from conveyor import keys
from tests.support import queues

pytestmark = pytest.mark.timeout(240)

#: Small enough that the module runs in about a minute on two cores; derandomized, so a
#: failure found once is found again.
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
#: Every idempotency key sent starts with this run's own prefix.
RUN = f"fuzz-{uuid.uuid4().hex[:8]}-"
QUEUES = ("ai", "n8n", "episodes", "maintenance")


def no_server_error(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """No 5xx, but the 503 the contract documents (broker or database away, Retry-After)."""
    status = response.status_code
    if status < 500:
        return
    documented = str(status) in case.operation.responses.status_codes
    assert status == 503 and documented and "retry-after" in response.headers, (
        f"{status} for {case.method} {case.formatted_path}: {response.text[:500]}"
    )


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,  # what the document calls invalid is refused (4xx)
    missing_required_header,
    unsupported_method,  # a method the document does not name for a path: 405
]


def _load(url: str, headers: dict[str, str] | None = None, *, coverage: bool = True) -> Any:
    any_task = {
        "include-name": ["POST /api/v1/jobs", "POST /api/v1/jobs/batch"],
        "phases": {"coverage": {"enabled": False}},
    }
    config = schemathesis.Config.from_dict(
        {
            "headers": headers or {},
            "request-timeout": 10,
            "phases": {"coverage": {"enabled": coverage}, "stateful": {"enabled": False}},
            "operations": [any_task],
        }
    )
    return schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)


def _unique(key: Any) -> Any:
    """A key the gateway would take, made this run's; one it refuses stays as it is."""
    if isinstance(key, str) and key.strip().strip('"') and len(key) <= 255:
        return (RUN + key)[:255]
    return key


def _harmless(case: schemathesis.Case) -> None:
    """Dry runs for the destructive operations; idempotency keys of this run only."""
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = _unique(case.headers["Idempotency-Key"])
    body = case.body
    if case.path == "/api/v1/jobs/batch" and isinstance(body, dict):
        for job in body.get("jobs") or []:
            if isinstance(job, dict) and "idempotency_key" in job:
                job["idempotency_key"] = _unique(job["idempotency_key"])
    if case.method == "DELETE" and case.path == "/api/v1/dead-letters":
        case.query = {**(case.query or {}), "dry_run": "true"}
    if case.path == "/api/v1/dead-letters/retry" and isinstance(body, dict):
        body["dry_run"] = True


def _fuzz(case: schemathesis.Case) -> None:
    _harmless(case)
    case.validate_response(case.call(), checks=CHECKS)


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's from_fixture reads and writes Function._nodeid, which pytest 9.2
    # no longer has: give it one.
    request.node._nodeid = request.node.nodeid


@pytest.fixture(scope="module", autouse=True)
def _clean_up(redis_client):
    yield
    queues.purge(redis_client, *QUEUES)
    mine = list(redis_client.scan_iter(match=keys.idempotency(None, RUN + "*"), count=1000))
    if mine:
        redis_client.delete(*mine)


@pytest.fixture(scope="module")
def dev_schema(gateway):
    return _load(gateway.url)


@pytest.fixture(scope="module")
def acme_schema(keyed_gateway):
    return _load(keyed_gateway.url, keyed_gateway.for_tenant("acme"), coverage=False)


@pytest.fixture(scope="module")
def keyless_schema(keyed_gateway):
    return _load(keyed_gateway.url, coverage=False)


@schemathesis.pytest.from_fixture("dev_schema").parametrize()
@FUZZ
def test_the_dev_gateway_answers_every_request_within_its_schema(case):
    _fuzz(case)


@(
    schemathesis.pytest.from_fixture("acme_schema")
    .exclude(
        name=[
            f"POST /api/v1/{path}"
            for path in ("ai/generate", "ai/chat", "ai/code", "ai/analyze", "workflow/execute")
        ]
        + ["POST /api/v1/db/logs", "POST /api/v1/jobs", "POST /api/v1/jobs/batch"]
    )
    .parametrize()
)
@FUZZ
def test_a_tenants_every_other_request_is_answered_within_the_schema(case):
    _fuzz(case)


@schemathesis.pytest.from_fixture("keyless_schema").parametrize()
@settings(FUZZ, max_examples=5)
def test_without_a_key_every_route_answers_within_the_schema(case):
    _fuzz(case)


def test_what_the_fuzzer_found_stays_fixed(gateway, dev_schema, redis_client):
    """Each answer in the envelope its status documents, with ``data.problems`` for a 400."""
    url = gateway.url
    queues.purge(redis_client, *QUEUES)
    past_the_cap = {
        "jobs": [
            {"task": "maintenance.ping", "payload": {"message": f"{RUN}first"}},
            {"task": "ai.generate", "payload": {"prompt": "later"}, "delay_s": 1.5e308},
        ]
    }
    answers = {
        # A delay past the cap was a 500, after the batch's first task group had been sent.
        ("POST", "/api/v1/jobs/batch"): httpx.post(
            f"{url}/api/v1/jobs/batch", json=past_the_cap, timeout=30
        ),
        # These 400s carried no data.problems.
        ("POST", "/api/v1/ai/generate"): httpx.post(
            f"{url}/api/v1/ai/generate", content=b"{", timeout=30
        ),
        ("GET", "/api/v1/dead-letters/{job_id}"): httpx.get(
            f"{url}/api/v1/dead-letters/a%00b", timeout=30
        ),
    }
    for (method, path), response in answers.items():
        assert response.status_code == 400, (path, response.text)
        dev_schema[path][method].validate_response(response)
    batch = answers[("POST", "/api/v1/jobs/batch")].json()["data"]["problems"]
    assert len(batch) == 1 and batch[0].startswith("body: jobs.1.delay_s: at most"), batch
    assert queues.messages(redis_client, "maintenance") == []
