"""Flower settings for Conveyor.

Used as::

    conveyor flower --conf=ops/flowerconfig.py          # or the absolute path in an image/host

``conveyor flower`` passes ``--conf`` through to Flower 2.x (``flower/options.py`` defines
``conf``; ``flower/command.py`` executes this file with ``tornado.options.parse_config_file``).
Flower reads every top-level name here that matches one of its options; other names (``os``,
helpers starting with ``_``) are ignored.

Order of precedence, checked in flower/command.py (2.2): ``FLOWER_*`` environment variables
are applied first, then this file (which overrides them), then the command line (which wins).
So this file:

* never sets ``basic_auth`` / ``auth`` / OAuth keys: credentials come only from the environment
  (``FLOWER_BASIC_AUTH=user:password``, or ``FLOWER_AUTH`` + ``FLOWER_OAUTH2_*``), where a
  secret store can inject them; a value here would silently replace them;
* takes each value it does set from the matching ``FLOWER_*`` variable when present, so the
  usual environment overrides keep working;
* cannot override ``--port`` / ``--address``, which ``conveyor flower`` always passes
  (from ``FLOWER_PORT`` / ``FLOWER_ADDRESS``, default 5555 / 127.0.0.1).

Security (see ops/RUNBOOK.md, "Flower"): ``/metrics`` and ``/healthcheck`` answer without
authentication, so Flower listens on 127.0.0.1 unless told otherwise and belongs on an internal
network only, never on a public address or Ingress.
"""

import os

_TRUE = {"1", "true", "yes", "on"}


def _env(name, default):
    value = os.environ.get(name, "").strip()
    return value if value else default


# --- Where it listens -----------------------------------------------------------------------
#: Loopback by default: nothing outside this host (or pod) reaches Flower unless an operator
#: sets FLOWER_ADDRESS=0.0.0.0 on a network that is internal (compose, Kubernetes ClusterIP).
address = _env("FLOWER_ADDRESS", "127.0.0.1")
port = int(_env("FLOWER_PORT", "5555"))

# --- State ------------------------------------------------------------------------------------
#: Off: Flower keeps what it saw in memory only. Persistent mode writes a shelve file into the
#: working directory (a writable volume, and a read-only root file system breaks it) and
#: restores stale task states after a restart. Job state that matters lives elsewhere:
#: results in Redis, episodes / executions / dead letters in Postgres.
persistent = False

#: Seconds after which a worker that stopped sending heartbeats disappears from the dashboard.
#: Autoscaled pods get a new node name each time; without a purge the worker list, and the
#: per-worker series on /metrics, grow with every scale-in.
purge_offline_workers = int(_env("FLOWER_PURGE_OFFLINE_WORKERS", "300"))

#: Tasks kept in memory (least recently seen dropped first). Flower's default of 100,000 costs
#: hundreds of MB at our argument sizes (argsrepr is capped at 200 characters by the submitter,
#: results are envelopes); 10,000 covers minutes to hours of history in a bounded ~50-100 MB.
#: Size the Flower container's memory limit with this number.
max_tasks = int(_env("FLOWER_MAX_TASKS", "10000"))

# --- What operators may do ------------------------------------------------------------------
#: Read-only by default: the dashboard cannot shut down workers, resize pools, cancel consumers
#: or revoke/terminate jobs, so a leaked dashboard password is not a fleet-wide off switch.
#: Set FLOWER_READ_ONLY=false for an operator session that needs those buttons; the same
#: actions are available from a shell with `celery -A workers.app control ...`.
read_only = _env("FLOWER_READ_ONLY", "true").lower() in _TRUE

# --- Display and metrics ----------------------------------------------------------------------
#: Columns of /tasks. No args/kwargs/result columns: payloads carry prompts and user data.
tasks_columns = "name,uuid,state,received,started,runtime,worker,retries"

#: Buckets (seconds) of flower_task_runtime_seconds on /metrics. Prometheus' defaults stop at
#: 10 s; AI jobs take seconds to minutes (hard limit 300 s), n8n jobs up to 120 s.
task_runtime_metric_buckets = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
