"""Any bytes and any Celery headers put straight on a queue (hypothesis): on the prefork, the
threads and the batched pool alike, each message ends acknowledged, and either ran or sits in
``dead_letters`` with a failed result; the worker never exits and the queue never stalls."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange

import celeryconfig
from tests.support import faults
from tests.support.queues import messages
from tests.support.waiting import wait_for
from workers.store import dead_letters

pytestmark = pytest.mark.faults

#: Headers Celery reads from a task message (protocol 2), each given any JSON value.
_CELERY_HEADERS = (
    "eta",
    "expires",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "group",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "shadow",
    "priority",
    "ignore_result",
    "stamped_headers",
    "lang",
    "conveyor_pack",
)

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)

_bodies = st.one_of(
    st.binary(max_size=300),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(_json_values, _json_values, _json_values).map(lambda v: json.dumps(v).encode()),
)

_headers = st.dictionaries(st.sampled_from(_CELERY_HEADERS), _json_values, max_size=4)

_content_types = st.sampled_from(["application/json", "application/x-python-serialize", "text/x"])

POOLS = {"maintenance": "maintenance.ping", "ai": "ai.generate", "episodes": "episodes.record"}


def _publish(url: str, queue: str, body: bytes, headers: dict[str, Any], content_type: str):
    with Connection(url, transport_options=celeryconfig.broker_transport_options) as conn:
        conn.Producer().publish(
            body,
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
            serializer=None,
        )


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_any_message_ends_run_or_dead_lettered_and_the_pool_goes_on(
    pool, workers, submitter, engine, redis_client, redis_url
):
    task = POOLS[pool]
    worker = workers.start(pool)
    seen = {"ran": 0, "dead": 0}

    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=_bodies, extra=_headers, content_type=_content_types)
    def one_message(body: bytes, extra: dict[str, Any], content_type: str) -> None:
        job_id = str(uuid.uuid4())
        try:
            _publish(redis_url, pool, body, {**extra, "id": job_id, "task": task}, content_type)
        except (TypeError, ValueError):
            return  # kombu cannot even send it (a header it cannot encode): nothing reached us

        def ended() -> str | None:
            if dead_letters.find(engine, job_id):
                return "dead"
            meta = redis_client.get(f"celery-task-meta-{job_id}")
            if meta and json.loads(meta)["status"] in ("SUCCESS", "FAILURE"):
                return "ran"
            return None

        outcome = wait_for(ended, timeout=30, interval=0.05, what=f"the end of {body[:40]!r}")
        seen[outcome] += 1
        assert worker.process.poll() is None, worker.log()[-3000:]

    one_message()
    wait_for(lambda: messages(redis_client, pool) == [], timeout=30, what="an empty queue")
    assert worker.process.poll() is None
    faults.report(
        f"hypothesis: any message on the {pool} queue",
        submitted=seen["ran"] + seen["dead"],
        completed=seen["ran"],
        lost=0,
        duplicated=0,
        dead_lettered=seen["dead"],
    )
