"""`conveyor dead-letters` as an operator runs it, a real process against the session's servers:
every tenant's rows unless --tenant, one line per outcome, and exit codes a script can use
(0 done, 1 nothing found, 2 bad input, 4 unreachable), never a traceback."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.cli.test_commands import _conveyor
from tests.support.queues import messages, purge
from workers.store.dead_letters import get_dead_letter, list_dead_letters, record

PING = "maintenance.ping"


@pytest.fixture
def clean_queue(redis_client):
    purge(redis_client, "maintenance")
    yield
    purge(redis_client, "maintenance")


@pytest.fixture
def letters(engine, redis_client, unique):
    """Dead letters of two tenants, of a task name only this test uses (so a listing by it
    holds only these), and of maintenance.ping for this test's tenant acme to resubmit."""
    now = datetime.now(UTC)
    task = f"test.{unique}"
    acme, globex = f"acme-{unique}", f"globex-{unique}"

    def row(name: str, tenant: str, hours_ago: float, **fields: Any) -> dict[str, Any]:
        return {
            "job_id": f"{name}-{unique}",
            "task": task,
            "queue": "maintenance",
            "payload": {"message": f"{name}-{unique}"},
            "reason": "exhausted",
            "error": "gave up after 3 attempts: boom",
            "attempts": 3,
            "failed_at": now - timedelta(hours=hours_ago),
            "tenant": tenant,
            **fields,
        }

    for fields in (
        row("a1", acme, 1),
        row("b1", globex, 2),
        row("a2", acme, 50),
        row("ping", acme, 3, task=PING),
        row("poison", acme, 4, task=PING, payload={"message": ["not", "text"]}),
    ):
        assert record(engine, redis_client, fields) is True
    return {"task": task, "acme": acme, "globex": globex, "unique": unique}


def lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def names(stdout: str) -> list[str]:
    return [row.get("job_id", row.get("dead_letter")).split("-")[0] for row in lines(stdout)]


def test_list_is_every_tenants_unless_tenant_is_given(letters):
    everyone = _conveyor("dead-letters", "list", "--task", letters["task"])
    assert everyone.returncode == 0, everyone.stderr
    assert names(everyone.stdout) == ["a1", "b1", "a2"]
    assert "payload" not in lines(everyone.stdout)[0]
    acme = _conveyor("dead-letters", "list", "--task", letters["task"], "--tenant", letters["acme"])
    assert names(acme.stdout) == ["a1", "a2"]
    recent = _conveyor("dead-letters", "list", "--task", letters["task"], "--since", "1d")
    assert names(recent.stdout) == ["a1", "b1"]
    one = _conveyor("dead-letters", "list", "--task", letters["task"], "--limit", "1")
    assert names(one.stdout) == ["a1"]
    nothing = _conveyor("dead-letters", "list", "--task", f"none.{letters['unique']}")
    assert (nothing.returncode, nothing.stdout) == (0, "")


def test_show_prints_one_dead_letter_with_its_payload(letters):
    unique = letters["unique"]
    shown = _conveyor("dead-letters", "show", f"b1-{unique}")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("{\n  ")  # pretty, for a person
    row = json.loads(shown.stdout)
    assert row["payload"] == {"message": f"b1-{unique}"} and row["tenant"] == letters["globex"]
    for argv in ((f"zz-{unique}",), (f"b1-{unique}", "--tenant", letters["acme"])):
        missing = _conveyor("dead-letters", "show", *argv)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (
            f"conveyor dead-letters show: no dead letter with job id {argv[0]}"
        )


def test_retry_dry_run_then_retry_then_again(engine, submitter, workers, letters, clean_queue):
    acme, unique = letters["acme"], letters["unique"]
    dry = _conveyor("dead-letters", "retry", "--task", PING, "--tenant", acme, "--dry-run")
    assert dry.returncode == 2, dry.stderr  # the poison payload would be refused
    assert [(r["dead_letter"], r["status"]) for r in lines(dry.stdout)] == [
        (f"poison-{unique}", "refused"),  # oldest first: poison failed 4 h ago, ping 3 h
        (f"ping-{unique}", "would resubmit"),
    ]
    assert "message: Input should be a valid string" in lines(dry.stdout)[0]["error"]
    assert get_dead_letter(engine, f"ping-{unique}", tenant=None)["resubmitted_at"] is None

    workers.start("maintenance")
    retried = _conveyor("dead-letters", "retry", f"ping-{unique}")
    assert retried.returncode == 0, retried.stderr
    [line] = lines(retried.stdout)
    assert (line["dead_letter"], line["status"]) == (f"ping-{unique}", "resubmitted")
    assert submitter.job(line["job_id"]).result(timeout=30)["success"] is True

    again = _conveyor("dead-letters", "retry", f"ping-{unique}")
    assert again.returncode == 1
    assert f"already resubmitted as job {line['job_id']}" in again.stderr
    assert "Traceback" not in again.stderr

    poison = _conveyor("dead-letters", "retry", "--task", PING, "--tenant", acme)
    assert poison.returncode == 2
    assert [(r["dead_letter"], r["status"]) for r in lines(poison.stdout)] == [
        (f"poison-{unique}", "refused")
    ]
    assert get_dead_letter(engine, f"poison-{unique}", tenant=None)["resubmitted_at"] is None


def test_retry_with_nothing_to_send_exits_1(letters):
    nothing = _conveyor("dead-letters", "retry", "--task", f"none.{letters['unique']}")
    assert nothing.returncode == 1
    assert nothing.stderr.strip() == "conveyor dead-letters retry: no dead letters to resubmit"
    unknown = _conveyor("dead-letters", "retry", f"zz-{letters['unique']}")
    assert unknown.returncode == 1
    assert f"no dead letter with job id zz-{letters['unique']}" in unknown.stderr


def test_retry_with_the_broker_down_is_unavailable_and_puts_the_row_back(engine, letters):
    job_id = f"ping-{letters['unique']}"
    down = _conveyor(
        "dead-letters", "retry", job_id,
        env={"CELERY_BROKER_URL": "redis://127.0.0.1:1/0"},
    )  # fmt: skip
    assert down.returncode == 4, down.stderr
    assert "could not enqueue maintenance.ping" in down.stderr
    assert "Traceback" not in down.stderr
    assert get_dead_letter(engine, job_id, tenant=None)["resubmitted_at"] is None


def test_purge_counts_first_and_deletes_with_yes(engine, letters):
    task, acme, globex = letters["task"], letters["acme"], letters["globex"]
    asked = _conveyor("dead-letters", "purge", "--before", "90m", "--tenant", globex)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.startswith(f"1 dead letter of tenant {globex} failed before ")
    assert asked.stdout.rstrip().endswith("Z: run again with --yes to delete them")
    assert len(list_dead_letters(engine, tenant=globex, task=task)) == 1

    done = _conveyor("dead-letters", "purge", "--before", "90m", "--tenant", globex, "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"purged 1 dead letter of tenant {globex} failed before ")
    assert list_dead_letters(engine, tenant=globex, task=task) == []
    assert [r["job_id"] for r in list_dead_letters(engine, tenant=acme, task=task)] == [
        f"a1-{letters['unique']}",
        f"a2-{letters['unique']}",
    ]

    again = _conveyor("dead-letters", "purge", "--before", "90m", "--tenant", globex, "--yes")
    assert again.returncode == 1
    assert f"no dead letters of tenant {globex} failed before " in again.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("purge", "--before", "soon"), "not a time: 'soon'"),
        (("list", "--limit", "0"), "limit must be from 1 to 1000"),
        (("list", "--until", "tomorrow"), "not a time: 'tomorrow'"),
        (("retry", "some-job", "--task", PING), "either one dead letter by its job id"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, expected):
    result = _conveyor("dead-letters", *argv)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_database_down_is_unavailable_not_a_traceback():
    result = _conveyor(
        "dead-letters", "list", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"}
    )
    assert result.returncode == 4, result.stderr
    assert "conveyor dead-letters list: the database is unreachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_retry_sends_the_job_for_the_dead_letters_tenant(redis_client, letters, clean_queue):
    retried = _conveyor("dead-letters", "retry", f"ping-{letters['unique']}")
    assert retried.returncode == 0, retried.stderr
    [message] = messages(redis_client, "maintenance")
    assert message["headers"]["conveyor_tenant"] == letters["acme"]
    assert message["headers"]["conveyor_retry_of"] == f"ping-{letters['unique']}"
