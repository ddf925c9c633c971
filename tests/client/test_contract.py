"""The public surface, pinned: renaming a task, moving it to another queue or changing the
schedule must be a conscious act that shows up here (and in DESIGN.md and README.md)."""

import subprocess
import sys

import beat_schedule
import celeryconfig
from conveyor.names import QUEUES, TASK_QUEUES
from conveyor.schemas import SCHEMAS
from tests.payloads import VALID


def test_public_task_names_and_queues():
    assert TASK_QUEUES == {
        "ai.generate": "ai",
        "ai.chat": "ai",
        "ai.code": "ai",
        "ai.analyze": "ai",
        "episodes.record": "episodes",
        "n8n.execute": "n8n",
        "maintenance.ping": "maintenance",
        "maintenance.queue_metrics": "maintenance",
        "maintenance.flush_dead_letters": "maintenance",
        "maintenance.reconcile_workflows": "maintenance",
        "maintenance.episode_retention": "maintenance",
    }
    assert QUEUES == ("ai", "n8n", "episodes", "maintenance")
    assert set(SCHEMAS) == set(TASK_QUEUES) == set(VALID)


def test_beat_schedule_is_pinned_and_every_entry_expires():
    schedule = beat_schedule.BEAT_SCHEDULE
    assert {name: (e["task"], e["schedule"]) for name, e in schedule.items()} == {
        "queue-metrics": ("maintenance.queue_metrics", 15.0),
        "flush-dead-letters": ("maintenance.flush_dead_letters", 60.0),
        "reconcile-workflows": ("maintenance.reconcile_workflows", 30.0),
        "episode-retention": ("maintenance.episode_retention", 3600.0),
    }
    for entry in schedule.values():
        assert entry["task"] in TASK_QUEUES
        assert 0 < entry["options"]["expires"] <= 2 * entry["schedule"]


def test_json_only_and_delivery_guarantees_configured():
    assert celeryconfig.accept_content == ["json"]
    assert celeryconfig.result_accept_content == ["json"]
    assert celeryconfig.task_serializer == "json"
    assert celeryconfig.task_acks_late is True
    assert celeryconfig.task_reject_on_worker_lost is True
    assert celeryconfig.task_create_missing_queues is False
    longest = max(p["time_limit"] for p in celeryconfig.conveyor_pools.values())
    assert celeryconfig.broker_transport_options["visibility_timeout"] > longest
    assert (
        celeryconfig.result_backend_transport_options["visibility_timeout"]
        == celeryconfig.broker_transport_options["visibility_timeout"]
    )


def test_the_client_library_never_imports_tasks_or_workers():
    code = (
        "import sys, conveyor; from conveyor import Submitter; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tasks', 'workers')); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
