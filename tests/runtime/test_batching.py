"""The batch mechanism's own fault paths, through a real worker: a message that kills its
pool process, and one whose batch fails with a permanent error, are isolated by splitting
their batches and end in ``dead_letters``; every other message of those batches is settled.
The same holds for records inside packed messages: each is isolated alone, under its own job
id, and its message is acknowledged once all its records are settled.

The worker imports this module (``-I tests.runtime.test_batching``) for its batch task.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from conveyor.messages import PACK_HEADER
from tests.support.waiting import wait_for
from workers.runtime import connections
from workers.runtime.batching import BatchContext, Item, Verdict, batch_job
from workers.store import dead_letters

TASK = "tests.batch_probe"
QUEUE = "episodes"


def _settled_key(run: str) -> str:
    return f"conveyor:test:batch-probe:{run}"


@batch_job(TASK, family="episodes")
def batch_probe(ctx: BatchContext, items: list[Item]) -> Verdict:
    """Settles each item by adding its job id to a Redis set; ``kill`` ends the process."""
    for item in items:
        if item.payload.get("kill"):
            os._exit(1)
        if item.payload.get("raise"):
            raise ValueError(f"cannot take {item.job_id}")
    client = connections.redis_client()
    for item in items:
        client.sadd(_settled_key(item.payload["run"]), item.job_id)
    return Verdict()


def test_a_killer_and_a_failing_message_are_isolated_and_the_rest_settled(
    workers, submitter, engine, redis_client
):
    run = uuid.uuid4().hex[:8]
    payloads = [{"run": run} for _ in range(40)]
    payloads[11] = {"run": run, "kill": True}
    payloads[29] = {"run": run, "raise": True}
    ids = [str(uuid.uuid4()) for _ in payloads]
    for job_id, payload in zip(ids, payloads, strict=True):
        submitter.app.send_task(
            TASK, args=(payload,), task_id=job_id, queue=QUEUE, routing_key=QUEUE
        )
    worker = workers.start(
        QUEUE,
        env={"CONVEYOR_MAX_DELIVERIES": "2", "CONVEYOR_EPISODES_FLUSH_MS": "1000"},
        args=("-I", "tests.runtime.test_batching"),
    )
    good = {job_id for i, job_id in enumerate(ids) if i not in (11, 29)}
    wait_for(
        lambda: {m.decode() for m in redis_client.smembers(_settled_key(run))} >= good,
        timeout=60,
        what="the 38 good messages settled",
    )
    killer = wait_for(lambda: dead_letters.find(engine, ids[11]), timeout=60, what="killer")
    failing = wait_for(lambda: dead_letters.find(engine, ids[29]), timeout=30, what="failing")
    assert killer["reason"] == "poison"
    assert "killed its pool process 2 times: WorkerLostError" in killer["error"]
    assert failing["reason"] == "permanent"
    assert f"ValueError: cannot take {ids[29]}" in failing["error"]
    assert redis_client.scard(_settled_key(run)) == 38
    assert worker.process.poll() is None  # the worker itself lived through it
    redis_client.delete(_settled_key(run))


def test_in_packed_messages_a_killer_and_a_failing_record_are_isolated_alone(
    workers, submitter, engine, redis_client
):
    run = uuid.uuid4().hex[:8]
    payloads = [{"run": run} for _ in range(40)]
    payloads[11] = {"run": run, "kill": True}
    payloads[29] = {"run": run, "raise": True}
    ids = [str(uuid.uuid4()) for _ in payloads]
    for start in range(0, 40, 10):  # four messages of ten records
        submitter.app.send_task(
            TASK,
            args=tuple(payloads[start : start + 10]),
            task_id=str(uuid.uuid4()),
            headers={PACK_HEADER: ids[start : start + 10]},
            queue=QUEUE,
            routing_key=QUEUE,
        )
    worker = workers.start(
        QUEUE,
        env={"CONVEYOR_MAX_DELIVERIES": "2", "CONVEYOR_EPISODES_FLUSH_MS": "1000"},
        args=("-I", "tests.runtime.test_batching"),
    )
    good = {job_id for i, job_id in enumerate(ids) if i not in (11, 29)}
    wait_for(
        lambda: {m.decode() for m in redis_client.smembers(_settled_key(run))} >= good,
        timeout=60,
        what="the 38 good records settled",
    )
    killer = wait_for(lambda: dead_letters.find(engine, ids[11]), timeout=60, what="killer")
    failing = wait_for(lambda: dead_letters.find(engine, ids[29]), timeout=30, what="failing")
    assert killer["reason"] == "poison" and killer["payload"] == payloads[11]
    assert "killed its pool process 2 times: WorkerLostError" in killer["error"]
    assert failing["reason"] == "permanent"
    assert f"ValueError: cannot take {ids[29]}" in failing["error"]
    # Every message acknowledged once all its records settled; nothing goes round again.
    wait_for(lambda: redis_client.hlen("unacked") == 0, timeout=10, what="messages acked")
    assert redis_client.scard(_settled_key(run)) == 38
    assert worker.process.poll() is None
    redis_client.delete(_settled_key(run))


def test_a_prefetch_that_cannot_hold_a_batch_is_refused_at_start():
    env = {
        **os.environ,
        "CONVEYOR_EPISODES_BATCH_SIZE": "600",
        "CONVEYOR_EPISODES_PREFETCH": "100",
        "CONVEYOR_EPISODES_CONCURRENCY": "2",
    }
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker", "episodes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 78, result.stderr
    assert "must be at least CONVEYOR_EPISODES_BATCH_SIZE (600)" in result.stderr
