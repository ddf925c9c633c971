"""Packed ``episodes.record`` messages through real workers: ``submit_many`` sends up to
``CONVEYOR_EPISODES_PACK`` records a message, each record keeps its own job id, and every
guarantee of a one-record message holds per record: written exactly once (through a SIGKILL
too), a poison record dead-lettered alone, idempotency keys per record, the message
acknowledged once all its records are settled.

Each fault test prints its counts (submitted, committed, duplicated, lost): run with ``-s``.
"""

from __future__ import annotations

import time
import uuid

import psycopg2
import pytest
from sqlalchemy import text

from conveyor.config import ClientConfig
from conveyor.messages import PACK_HEADER
from tests.episodes.test_workers import (
    _already_there,
    _episode,
    _events,
    _insert_waiting_on_lock,
    _report,
    _rows,
)
from tests.support.queues import messages, purge
from tests.support.waiting import wait_for
from tests.support.workers import FAST_REDELIVERY
from workers.store import dead_letters

QUEUE = "episodes"
PACK = ClientConfig.from_env().episodes_pack


@pytest.fixture(autouse=True)
def empty_queue(redis_client):
    purge(redis_client, QUEUE)
    yield
    purge(redis_client, QUEUE)


def _episode_ids(engine, tag: str) -> dict[str, int]:
    """episode_id -> metadata.i of the rows of ``tag``."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT episode_id, (metadata->>'i')::int FROM episodic_logs"
                " WHERE session_id = :tag"
            ),
            {"tag": tag},
        ).all()
    return dict(rows)


def _unacked(redis_client) -> int:
    return redis_client.hlen("unacked")


def _send_packed(submitter, payloads: list, job_ids: list[str]) -> str:
    """A packed message sent straight onto the queue, past the submitter's validation."""
    message_id = str(uuid.uuid4())
    submitter.app.send_task(
        "episodes.record",
        args=tuple(payloads),
        task_id=message_id,
        headers={PACK_HEADER: job_ids},
        queue=QUEUE,
        routing_key=QUEUE,
    )
    return message_id


def test_submit_many_packs_records_and_each_lands_once_under_its_own_job_id(
    workers, submitter, engine, redis_client, unique
):
    assert PACK >= 3  # the default (100); the counts below assume packs of many
    tag = f"packed-{unique}"
    n = 2 * PACK + PACK // 2
    payloads = [_episode(tag, i) for i in range(n)]
    payloads[7] = {**payloads[7], "episode_id": f"own-{unique}"}
    jobs = submitter.submit_many("episodes.record", payloads)
    single = submitter.submit("episodes.record", _episode(tag, n))

    # On the queue: three packed messages, then the single record as a plain Celery message.
    waiting = messages(redis_client, QUEUE)
    assert len(waiting) == 4
    packed = [m for m in waiting if PACK_HEADER in m["headers"]]
    assert sorted(len(m["headers"][PACK_HEADER]) for m in packed) == sorted([PACK, PACK, PACK // 2])
    oldest_first = packed[::-1]  # kombu pushes on the left
    assert [j for m in oldest_first for j in m["headers"][PACK_HEADER]] == [j.id for j in jobs]
    assert not {m["headers"]["id"] for m in packed} & {j.id for j in jobs}
    [plain] = [m for m in waiting if PACK_HEADER not in m["headers"]]
    assert plain["headers"]["id"] == single.id

    workers.start(QUEUE, env={"CONVEYOR_EPISODES_FLUSH_MS": "50"})
    wait_for(lambda: _rows(engine, tag) >= n + 1, timeout=30, what=f"{n + 1} episodes written")
    time.sleep(0.5)  # would anything more land?
    expected = {f"job:{job.id}": i for i, job in enumerate(jobs)}
    expected[f"own-{unique}"] = expected.pop(f"job:{jobs[7].id}")
    expected[f"job:{single.id}"] = n
    assert _episode_ids(engine, tag) == expected
    wait_for(lambda: _unacked(redis_client) == 0, timeout=10, what="every message acknowledged")
    assert messages(redis_client, QUEUE) == []
    counts = _report("packed submit_many", n + 1, engine, tag, messages=4)
    assert (counts["committed"], counts["duplicated"], counts["lost"]) == (n + 1, 0, 0)


def test_a_poison_record_in_a_packed_message_is_dead_lettered_alone(
    workers, submitter, engine, redis_client, unique
):
    tag = f"packed-poison-{unique}"
    payloads = [_episode(tag, i) for i in range(30)]
    payloads[12] = {"user_id": "u", "model_type": "m", "tokens": {"prompt": -1}}
    payloads[20] = "not an object"
    job_ids = [str(uuid.uuid4()) for _ in payloads]
    message_id = _send_packed(submitter, payloads, job_ids)
    # A pack that does not hold together (two job ids, three records) is refused whole.
    broken = _send_packed(submitter, [_episode(tag, 100)] * 3, [str(uuid.uuid4())] * 2)
    workers.start(QUEUE, env={"CONVEYOR_EPISODES_FLUSH_MS": "50"})

    wait_for(lambda: _rows(engine, tag) >= 28, timeout=30, what="the 28 good records")
    first = wait_for(lambda: dead_letters.find(engine, job_ids[12]), timeout=10, what="poison")
    second = wait_for(lambda: dead_letters.find(engine, job_ids[20]), timeout=10, what="not obj")
    assert (first["reason"], first["task"], first["queue"]) == ("poison", "episodes.record", QUEUE)
    assert "tokens.prompt: Input should be greater than or equal to 0" in first["error"]
    assert first["payload"] == payloads[12]
    assert second["reason"] == "poison" and "must be a JSON object" in second["error"]
    assert [e["event"] for e in _events(redis_client, job_ids[12])] == ["episode_error"]
    envelope = submitter.job(job_ids[12]).result(timeout=10)
    assert envelope["success"] is False and "tokens.prompt" in envelope["error"]
    assert dead_letters.find(engine, message_id) is None  # the message itself is not dead
    good = {f"job:{j}" for i, j in enumerate(job_ids) if i not in (12, 20)}
    assert set(_episode_ids(engine, tag)) == good

    refused = wait_for(lambda: dead_letters.find(engine, broken), timeout=10, what="broken pack")
    assert refused["reason"] == "poison" and "2 job ids, 3 records" in refused["error"]
    wait_for(lambda: _unacked(redis_client) == 0, timeout=10, what="every message acknowledged")
    time.sleep(0.5)
    counts = _report("poison in a packed message", 28, engine, tag, dead_lettered=2)
    assert (counts["committed"], counts["duplicated"], counts["lost"]) == (28, 0, 0)


def test_idempotency_keys_hold_per_record_inside_packs(
    workers, submitter, engine, redis_client, unique
):
    tag = f"packed-idem-{unique}"
    n = PACK + 10
    payloads = [_episode(tag, i) for i in range(n)]
    keys = [f"{unique}-{i}" for i in range(n)]
    first = submitter.submit_many("episodes.record", payloads, idempotency_keys=keys)
    # Again, with half the keys seen before and ten new records among them.
    more = [_episode(tag, n + i) for i in range(10)]
    again = submitter.submit_many(
        "episodes.record",
        payloads[::2] + more,
        idempotency_keys=keys[::2] + [f"{unique}-new-{i}" for i in range(10)],
    )
    assert [j.id for j in again[: len(first[::2])]] == [j.id for j in first[::2]]
    assert all(j.duplicate for j in again[: len(first[::2])])
    assert not any(j.duplicate for j in again[len(first[::2]) :])
    waiting = messages(redis_client, QUEUE)
    sent = [j for m in waiting for j in m["headers"].get(PACK_HEADER, [m["headers"]["id"]])]
    assert sorted(sent) == sorted([j.id for j in first] + [j.id for j in again[-10:]])

    workers.start(QUEUE, env={"CONVEYOR_EPISODES_FLUSH_MS": "50"})
    wait_for(lambda: _rows(engine, tag) >= n + 10, timeout=30, what="every record written")
    time.sleep(0.5)
    expected = {f"job:{j.id}" for j in first} | {f"job:{j.id}" for j in again[-10:]}
    assert set(_episode_ids(engine, tag)) == expected
    counts = _report("idempotency keys in packs", n + 10, engine, tag)
    assert (counts["committed"], counts["duplicated"], counts["lost"]) == (n + 10, 0, 0)


@pytest.mark.faults
def test_sigkill_mid_batch_with_packed_messages_every_record_lands_exactly_once(
    workers, submitter, engine, database_url, redis_client, unique
):
    tag = f"packed-kill-{unique}"
    records = [_episode(tag, i) for i in range(3000)]
    first = workers.start(QUEUE, env=FAST_REDELIVERY)
    submitter.submit_many("episodes.record", records[:500])
    wait_for(lambda: _rows(engine, tag) == 500, timeout=30, what="first 500 written and acked")

    # Hold the table so the next batches stop inside their INSERT: the worker then holds
    # packed messages unacknowledged, some of their records in a statement, some buffered.
    blocker = psycopg2.connect(database_url)
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLE episodic_logs IN SHARE ROW EXCLUSIVE MODE")
    try:
        jobs = submitter.submit_many("episodes.record", records[500:])
        wait_for(lambda: _insert_waiting_on_lock(engine), timeout=30, what="an INSERT in flight")
        time.sleep(0.5)  # let the consumer take more of the queue into its buffer
        held = _unacked(redis_client)
        first.kill()  # SIGKILL, worker and pool processes: no ack, no shutdown
        first.process.wait(10)
    finally:
        blocker.commit()  # the killed worker's INSERTs go on alone, and commit: never acked
        blocker.close()
    at_kill = _rows(engine, tag)

    second = workers.start(QUEUE, env=FAST_REDELIVERY)
    wait_for(lambda: _rows(engine, tag) >= 3000, timeout=60, what="all 3000 written")
    time.sleep(1.0)  # would anything more land?
    counts = _report(
        "SIGKILL mid-batch, packed",
        3000,
        engine,
        tag,
        messages=5 + len(jobs) // PACK,
        unacked_messages_at_kill=held,
        committed_when_killed=at_kill,
        redelivered_already_written=_already_there(second),
    )
    assert (counts["committed"], counts["duplicated"], counts["lost"]) == (3000, 0, 0)
    assert held > 0 and 500 <= at_kill < 3000
    assert counts["redelivered_already_written"] > 0  # exactly once, not at most
    ids = _episode_ids(engine, tag)
    assert {f"job:{j.id}" for j in jobs} <= set(ids)
    wait_for(lambda: _unacked(redis_client) == 0, timeout=30, what="every message acknowledged")


@pytest.mark.faults
def test_packs_held_at_a_warm_shutdown_go_back_whole_and_land_once(
    workers, submitter, engine, redis_client, unique
):
    tag = f"packed-shutdown-{unique}"
    n = PACK + PACK // 2
    jobs = submitter.submit_many("episodes.record", [_episode(tag, i) for i in range(n)])
    # A worker that holds them unwritten: its flush window outlasts the test, the batch is
    # not full.
    holder = workers.start(QUEUE, env={"CONVEYOR_EPISODES_FLUSH_MS": "600000"})
    wait_for(
        lambda: _unacked(redis_client) == 2 and messages(redis_client, QUEUE) == [],
        timeout=20,
        what="both packs taken and held",
    )
    assert _rows(engine, tag) == 0
    holder.stop()  # SIGTERM: a warm shutdown
    wait_for(
        lambda: len(messages(redis_client, QUEUE)) == 2 and _unacked(redis_client) == 0,
        timeout=20,
        what="both packs back on the queue, whole",
    )
    back = messages(redis_client, QUEUE)
    assert sorted(len(m["headers"][PACK_HEADER]) for m in back) == [PACK // 2, PACK]

    workers.start(QUEUE, env={"CONVEYOR_EPISODES_FLUSH_MS": "50"})
    wait_for(lambda: _rows(engine, tag) >= n, timeout=30, what=f"{n} episodes written")
    time.sleep(0.5)  # would anything more land?
    assert _episode_ids(engine, tag) == {f"job:{job.id}": i for i, job in enumerate(jobs)}
    wait_for(lambda: _unacked(redis_client) == 0, timeout=10, what="every message acknowledged")
    counts = _report("packs held at a warm shutdown", n, engine, tag, messages=2)
    assert (counts["committed"], counts["duplicated"], counts["lost"]) == (n, 0, 0)
