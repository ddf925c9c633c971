"""Everyday trips of the `conveyor` command, tried as a new user would: each ends in one line
that says what happened and an exit code a script can use, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest


def _conveyor(*argv: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_cancel_says_whether_there_was_anything_to_stop(workers, submitter):
    unknown = _conveyor("cancel", str(uuid.uuid4()))
    assert unknown.returncode == 0
    assert "not started: queued, or unknown to this broker" in unknown.stdout
    workers.start("maintenance")
    job = submitter.submit("maintenance.ping", {"message": "done soon"})
    assert job.result(timeout=30)["success"] is True
    finished = _conveyor("cancel", job.id)
    assert finished.returncode == 1
    assert "already finished: nothing to cancel" in finished.stderr


def test_follow_with_a_timeout_waits_that_long_in_all():
    """Nobody consumes the queue: `--follow --timeout 5` gives up after ~5 s, not 10 (the
    events and the result share one budget). The margin is the command's own start-up, which
    takes seconds on a loaded 2-core machine."""
    started = time.monotonic()
    result = _conveyor(
        "submit", "maintenance.ping", "--data", '{"message": "nobody home"}',
        "--follow", "--timeout", "5",
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert "did not finish within 5 s" in result.stderr
    assert 5 <= took < 8.5, took


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--cursor", "WzEsMWU0MDBd"), "not a cursor from this listing"),  # [1,1e400]
        (("--since", "99999999999d"), "reaches before the year 1"),
        (("--search", " ".join(["word"] * 20_000)), "search must be at most 32 words"),
    ],
)
def test_episodes_refuses_what_it_cannot_use_in_one_line(argv, expected):
    result = _conveyor("episodes", *argv)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_episodes_with_the_database_down_is_unavailable_not_a_traceback():
    result = _conveyor("episodes", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"})
    assert result.returncode == 4, result.stderr
    assert "the database is unreachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_submit_wait_of_an_episode_returns_its_envelope_once_the_row_is_written(workers):
    workers.start("episodes")
    started = time.monotonic()
    result = _conveyor(
        "submit", "episodes.record", "--data", '{"user_id": "u-wait", "model_type": "m"}',
        "--wait", "--timeout", "30",
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    job_id, envelope = result.stdout.strip().splitlines()
    envelope = json.loads(envelope)
    assert envelope["success"] is True and envelope["request_id"] == job_id
    assert envelope["data"] == {"episode_id": f"job:{job_id}", "written": True}
    assert took < 10, took


def test_waiting_on_a_queue_no_worker_consumes_says_so(redis_client):
    from tests.support.queues import purge

    result = _conveyor(
        "submit", "maintenance.ping", "--data", '{"message": "anyone?"}', "--wait",
        "--timeout", "6",
    )  # fmt: skip
    purge(redis_client, "maintenance")
    assert result.returncode == 3
    assert "no running worker consumes the 'maintenance' queue" in result.stderr


def test_redis_lost_while_waiting_is_unavailable_not_celerys_restart_message(workers, tmp_path):
    from workers.dev.embedded import EmbeddedRedis

    valkey = EmbeddedRedis(tmp_path / "valkey", persist=False)
    url = valkey.start()
    env = {"REDIS_URL": url, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}
    try:
        waiting = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "submit", "maintenance.ping", "--wait",
             "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
        )  # fmt: skip
        time.sleep(2.0)  # submitted, and waiting on its result: nobody runs it
        valkey.stop()
        _out, err = waiting.communicate(timeout=90)
    finally:
        valkey.stop()
    assert waiting.returncode == 4, err
    assert "lost Redis while waiting" in err and "Traceback" not in err
    assert "must be restarted" not in err
