"""The public surface, pinned: renaming a task, moving it to another queue or changing the
schedule must be a conscious act that shows up here (and in DESIGN.md and README.md)."""

import json
import subprocess
import sys

import beat_schedule
import celeryconfig
from conveyor.names import QUEUES, TASK_QUEUES
from conveyor.schemas import SCHEMAS
from tests.payloads import VALID
from workers import settings


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
    longest = max(p.time_limit_s for p in settings.pools().values())
    assert celeryconfig.broker_transport_options["visibility_timeout"] > longest
    assert (
        celeryconfig.result_backend_transport_options["visibility_timeout"]
        == celeryconfig.broker_transport_options["visibility_timeout"]
    )


def test_the_client_library_never_imports_tasks_or_workers():
    code = (
        "import sys, conveyor; from conveyor import Submitter; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tasks', 'workers', 'celeryconfig', 'beat_schedule')); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_registered_tasks_are_the_public_task_table_and_each_pool_loads_only_its_own():
    """What the workers register is what the contract says, pool by pool: a pool's worker
    loads only its own task modules, which register exactly the tasks routed to its queue."""
    code = (
        "import json; from workers.app import app; from workers.pools import POOL_TASK_MODULES; "
        "import importlib; out = {}\n"
        "for pool, modules in POOL_TASK_MODULES.items():\n"
        "    before = set(app.tasks)\n"
        "    [importlib.import_module(m) for m in modules]\n"
        "    out[pool] = sorted(set(app.tasks) - before)\n"
        "print(json.dumps(out))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    registered = json.loads(out.stdout)
    public = {n for n in registered for n in registered[n] if not n.startswith("celery.")}
    assert public == set(TASK_QUEUES)
    for pool, names in registered.items():
        assert {TASK_QUEUES[n] for n in names if n in TASK_QUEUES} == {pool}


def test_beats_frequent_housekeeping_stays_out_of_flowers_list():
    code = (
        "from workers.app import app; import tasks.maintenance; "
        "print(sorted(n for n, t in app.tasks.items() "
        "if n.startswith('maintenance.') and not t.send_events))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    quiet = json.loads(out.stdout.replace("'", '"'))
    assert quiet == [
        "maintenance.flush_dead_letters",
        "maintenance.queue_metrics",
        "maintenance.reconcile_workflows",
    ]
    assert beat_schedule.BEAT_SCHEDULE["episode-retention"]["task"] not in quiet
