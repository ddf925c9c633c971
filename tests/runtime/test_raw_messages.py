"""Raw messages straight onto each kind of pool's queue, as a buggy or hostile producer would
send them: the worker never stops, every message is acknowledged, and each ends in
``dead_letters`` with a failed result its caller can read; the queue goes on serving."""

from __future__ import annotations

import uuid

import pytest
from kombu import Connection, Exchange

import celeryconfig
from tests.support.queues import messages
from tests.support.waiting import wait_for
from workers.store import dead_letters

pytestmark = pytest.mark.faults

_DEEP = 10_000


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


#: (name, body, headers beyond id/task, whether the message carries an id)
CORPUS: list[tuple[str, bytes, dict, bool]] = [
    ("body is an object", b'{"message": "x"}', {}, True),
    ("body has two parts", b'[[{"message": "x"}], {}]', {}, True),
    ("embed is not an object", b'[[{"message": "x"}], {}, 5]', {}, True),
    ("args is not a list", b"[5, {}, {}]", {}, True),
    ("kwargs is not an object", b'[[{"message": "x"}], 5, {}]', {}, True),
    ("two payloads", b'[[{"message": "x"}, {"message": "y"}], {}, {}]', {}, True),
    ("an unexpected keyword", b'[[{"message": "x"}], {"x": 1}, {}]', {}, True),
    ("no args at all", b"[[], {}, {}]", {}, True),
    ("not JSON", b"{not json", {}, True),
    ("nested too deep", f"[[{_deep(_DEEP)}], {{}}, {{}}]".encode(), {}, True),
    ("no task header", b'[[{"message": "x"}], {}, {}]', {"task": None}, True),
]

#: pool -> (task, a good payload)
POOLS = {
    "maintenance": ("maintenance.ping", {"message": "after the corpus"}),
    "ai": ("ai.generate", {"prompt": "after the corpus"}),
}


def _publish(redis_url: str, queue: str, body: bytes, headers: dict) -> None:
    with Connection(redis_url, transport_options=celeryconfig.broker_transport_options) as conn:
        conn.Producer().publish(
            body,
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            headers={k: v for k, v in headers.items() if v is not None},
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
        )


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_no_raw_message_stops_a_pool_and_each_ends_in_dead_letters(
    pool, workers, submitter, engine, redis_client, redis_url
):
    task, good = POOLS[pool]
    worker = workers.start(pool)
    sent = []
    for name, body, extra, has_id in CORPUS:
        job_id = str(uuid.uuid4())
        headers = {"id": job_id if has_id else None, "task": task, "lang": "py", **extra}
        _publish(redis_url, pool, body, headers)
        sent.append((name, job_id))

    for name, job_id in sent:
        row = wait_for(
            lambda job_id=job_id: dead_letters.find(engine, job_id),
            timeout=30,
            what=f"dead letter of {name!r}",
        )
        assert row["reason"] in ("poison", "refused"), (name, row)
        envelope = submitter.job(job_id).result(timeout=30)
        assert envelope["success"] is False, (name, envelope)

    assert worker.process.poll() is None, worker.log()[-3000:]
    job = submitter.submit(task, good)
    assert job.result(timeout=60)["success"] is True
    assert messages(redis_client, pool) == []


def test_a_raw_record_the_episodes_pool_cannot_use_ends_in_dead_letters(
    workers, submitter, engine, redis_client, redis_url
):
    worker = workers.start("episodes")
    sent = []
    for name, body, extra, _ in CORPUS:
        job_id = str(uuid.uuid4())
        headers = {"id": job_id, "task": "episodes.record", "lang": "py", **extra}
        _publish(redis_url, "episodes", body, headers)
        sent.append((name, job_id))
    for name, job_id in sent:
        row = wait_for(
            lambda job_id=job_id: dead_letters.find(engine, job_id),
            timeout=30,
            what=f"dead letter of {name!r}",
        )
        assert row["reason"] in ("poison", "refused"), (name, row)
    assert worker.process.poll() is None, worker.log()[-3000:]
    good = submitter.submit("episodes.record", {"user_id": "u", "model_type": "m"})
    wait_for(
        lambda: _episode_written(engine, good.id),
        timeout=30,
        what="a good record after the corpus",
    )
    assert messages(redis_client, "episodes") == []


def _episode_written(engine, job_id: str) -> bool:
    from sqlalchemy import text

    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("SELECT 1 FROM episodic_logs WHERE episode_id = :e"), {"e": f"job:{job_id}"}
            ).first()
        )


def _nested(depth: int) -> dict:
    value: dict = {"leaf": True}
    for _ in range(depth):
        value = {"n": value}
    return value


def test_a_record_the_pool_cannot_take_is_dead_lettered_alone(
    workers, submitter, engine, redis_client
):
    """Nested ~950 levels: valid JSON, but the prefork pool cannot pickle it. It ends in
    dead_letters by itself; the good records around it are written, none twice."""
    workers.start("episodes")
    bad_id = str(uuid.uuid4())
    good = [str(uuid.uuid4()) for _ in range(20)]
    for n, job_id in enumerate(good):
        if n == 10:
            submitter.app.send_task(
                "episodes.record",
                args=({"user_id": "u", "model_type": "m", "metadata": _nested(950)},),
                task_id=bad_id,
                queue="episodes",
                routing_key="episodes",
            )
        submitter.app.send_task(
            "episodes.record",
            args=({"user_id": "u", "model_type": "m"},),
            task_id=job_id,
            queue="episodes",
            routing_key="episodes",
        )
    row = wait_for(lambda: dead_letters.find(engine, bad_id), timeout=60, what="dead letter")
    assert row["reason"] == "poison"
    wait_for(
        lambda: all(_episode_written(engine, job_id) for job_id in good),
        timeout=60,
        what="the 20 good records",
    )
    assert messages(redis_client, "episodes") == []
