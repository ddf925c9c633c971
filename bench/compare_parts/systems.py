"""Conveyor and its baselines: how each one's workers start, and where its queue lives.

Every system drains with the same concurrency story: **two processes execute jobs, one per
core** (Conveyor's maintenance pool as shipped runs one: it is measured as shipped, and again
with ``CONVEYOR_MAINTENANCE_CONCURRENCY=2``). Per system:

| key | worker(s) |
|---|---|
| ``conveyor`` | ``conveyor worker maintenance`` as shipped (prefork, concurrency 1, prefetch 1) |
| ``conveyor_c2`` | the same with ``CONVEYOR_MAINTENANCE_CONCURRENCY=2`` |
| ``bare`` | ``celery -A bench.baselines.conveyor_bare`` + the maintenance pool's argv, -c 2 |
| ``celery_defaults`` | ``celery -A bench.baselines.celery_defaults worker --concurrency 2`` |
| ``celery_tuned`` | 2 x ``celery -A bench.baselines.celery_tuned worker -P solo`` (prefetch 64) |
| ``dramatiq`` | ``dramatiq bench.baselines.dramatiq_app --processes 2 --threads 8`` |
| ``huey`` | ``huey_consumer bench.baselines.huey_app.huey -k process -w 2`` |
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.compare_parts.procs import ROOT

BIN = Path(sys.executable).parent
URL_ENV = "BENCH_REDIS_URL"
#: A database URL nothing listens on: the ping path and the bare task need no Postgres, and
#: a worker that tried to reach one would fail loudly instead of touching someone's database.
NO_DATABASE = "postgresql://bench@127.0.0.1:9/no_database_needed"

#: kombu's Redis transport: a queue is one list per priority step (step 0 unsuffixed).
_STEPS = (0, 3, 6, 9)
_CONVEYOR_SEP = ":"  # conveyor.config.broker_transport_options
_KOMBU_SEP = "\x06\x16"  # kombu's default


def _kombu_lists(queue: str, sep: str) -> list[str]:
    return [queue if step == 0 else f"{queue}{sep}{step}" for step in _STEPS]


Command = tuple[str, list[str], dict[str, str]]  # (name, argv, extra env)


@dataclass
class System:
    key: str
    label: str
    #: Who runs the jobs during a drain.
    story: str
    #: (command, key) reads whose sum is the messages still waiting in the queue.
    waiting: list[tuple[str, str]]
    #: (command, key) reads whose sum is every message not finished (waiting + taken).
    outstanding: list[tuple[str, str]]
    #: Whether outstanding == 0 means every job ran (acknowledged after running); if not, it
    #: means every job was taken, and the last few may still be running (microseconds).
    acked_after_run: bool
    #: Jobs pre-loaded for a drain (sized for a few seconds on this kind of machine).
    drain_jobs: int
    #: Where a latency job's start time comes from: ``stamp`` (the task writes ``time.time()``
    #: into ``bench:stamps``) or ``events`` (Conveyor's ``*_start`` event timestamp).
    start_source: str
    #: Key of the producer adapter (``producer.ADAPTERS``) that pre-loads and times it.
    producer: str
    #: The Python module its worker needs (a baseline whose package is missing is skipped).
    requires: str | None = None
    #: Shares its pre-loaded backlog with another system (the same messages).
    backlog_of: str | None = None
    #: Whether its jobs store Celery results (checked after each drain: all SUCCESS).
    stores_results: bool = False
    #: The environment: Conveyor's (REDIS_URL, ...) or a clean one.
    conveyor_env: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    commands: Callable[[], list[Command]] = lambda: []

    def available(self) -> str | None:
        """None when it can run; else why not."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed (pip install the bench extra)"
        return None


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _conveyor_worker() -> list[Command]:
    script = BIN / "conveyor"
    argv = [str(script)] if script.exists() else _python("-m", "workers.cli")
    return [("conveyor-worker-maintenance", [*argv, "worker", "maintenance"], {})]


def _bare_worker() -> list[Command]:
    from workers import settings
    from workers.pools import worker_argv

    spec = replace(settings.pool("maintenance"), concurrency=2)
    argv = worker_argv(spec, hostname="bare@%h")
    return [
        ("celery-bare", _python("-m", "celery", "-A", "bench.baselines.conveyor_bare", *argv), {})
    ]


def _celery_defaults_worker() -> list[Command]:
    argv = _python("-m", "celery", "-A", "bench.baselines.celery_defaults", "worker")
    return [("celery-defaults", [*argv, "--concurrency=2"], {})]


#: Celery tuned's worker command line (bench.baselines.celery_tuned), less the node name.
TUNED_WORKER_ARGS = [
    "--pool=solo",
    "--prefetch-multiplier=64",
    "--without-gossip",
    "--without-mingle",
    "--without-heartbeat",
    "--loglevel=WARNING",
]


def _celery_tuned_workers() -> list[Command]:
    base = _python(
        "-m", "celery", "-A", "bench.baselines.celery_tuned", "worker", *TUNED_WORKER_ARGS
    )
    return [(f"celery-tuned-{n}", [*base, f"--hostname=tuned{n}@%h"], {}) for n in (1, 2)]


def _dramatiq_workers() -> list[Command]:
    argv = [str(BIN / "dramatiq"), "bench.baselines.dramatiq_app", "--processes=2", "--threads=8"]
    return [("dramatiq", argv, {})]


def _huey_workers() -> list[Command]:
    argv = [str(BIN / "huey_consumer"), "bench.baselines.huey_app.huey", "-k", "process", "-w", "2"]
    return [("huey", argv, {})]


def all_systems() -> dict[str, System]:
    conveyor_lists = _kombu_lists("maintenance", _CONVEYOR_SEP)
    conveyor_waiting = [("llen", k) for k in conveyor_lists]
    conveyor_outstanding = [*conveyor_waiting, ("hlen", "unacked")]

    def kombu(queue: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        waiting = [("llen", k) for k in _kombu_lists(queue, _KOMBU_SEP)]
        return waiting, [*waiting, ("hlen", "unacked")]

    defaults_w, defaults_o = kombu("celery")
    tuned_w, tuned_o = kombu("bench_tuned")
    systems = [
        System(
            "conveyor",
            "Conveyor maintenance.ping (as shipped)",
            "`conveyor worker maintenance` as shipped: prefork, 1 process, prefetch 1",
            conveyor_waiting,
            conveyor_outstanding,
            acked_after_run=True,
            drain_jobs=1200,
            start_source="events",
            producer="conveyor",
            conveyor_env=True,
            stores_results=True,
            commands=_conveyor_worker,
        ),
        System(
            "conveyor_c2",
            "Conveyor maintenance.ping, concurrency 2",
            "`conveyor worker maintenance` with CONVEYOR_MAINTENANCE_CONCURRENCY=2: prefork, "
            "2 processes",
            conveyor_waiting,
            conveyor_outstanding,
            acked_after_run=True,
            drain_jobs=1200,
            start_source="events",
            producer="conveyor",
            backlog_of="conveyor",
            conveyor_env=True,
            stores_results=True,
            extra_env={"CONVEYOR_MAINTENANCE_CONCURRENCY": "2"},
            commands=_conveyor_worker,
        ),
        System(
            "bare",
            "bare task, Conveyor's Celery settings",
            "celeryconfig + the maintenance pool's worker argv, prefork, 2 processes",
            conveyor_waiting,
            conveyor_outstanding,
            acked_after_run=True,
            drain_jobs=1200,
            start_source="stamp",
            producer="bare",
            conveyor_env=True,
            stores_results=True,
            commands=_bare_worker,
        ),
        System(
            "celery_defaults",
            "Celery, defaults",
            "Celery defaults: prefork, 2 processes (= cores), prefetch 4, early ack",
            defaults_w,
            defaults_o,
            acked_after_run=False,
            drain_jobs=4000,
            start_source="stamp",
            producer="celery_defaults",
            commands=_celery_defaults_worker,
        ),
        System(
            "celery_tuned",
            "Celery, tuned",
            "2 x `-P solo`, prefetch 64, acks_late, results ignored, no events/gossip/mingle/"
            "heartbeat",
            tuned_w,
            tuned_o,
            acked_after_run=True,
            drain_jobs=8000,
            start_source="stamp",
            producer="celery_tuned",
            commands=_celery_tuned_workers,
        ),
        System(
            "dramatiq",
            "Dramatiq",
            "2 processes x 8 threads (Dramatiq's defaults), acked after running",
            [("llen", "dramatiq:default")],
            [("hlen", "dramatiq:default.msgs")],
            acked_after_run=True,
            drain_jobs=12000,
            start_source="stamp",
            producer="dramatiq",
            requires="dramatiq",
            commands=_dramatiq_workers,
        ),
        System(
            "huey",
            "huey",
            "2 worker processes (`-k process -w 2`); huey pops without acknowledging",
            [("llen", "huey.redis.bench")],
            [("llen", "huey.redis.bench")],
            acked_after_run=False,
            drain_jobs=10000,
            start_source="stamp",
            producer="huey",
            requires="huey",
            commands=_huey_workers,
        ),
    ]
    return {s.key: s for s in systems}


def environment(system: System, redis_url: str, home: Path) -> dict[str, str]:
    """The environment of a system's processes (workers and producer)."""
    drop = ("REDIS_URL", "DATABASE_URL", "CELERY_", "CONVEYOR_", URL_ENV, "DRAMATIQ_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(ROOT)
    env[URL_ENV] = redis_url
    if system.conveyor_env:
        env.update(
            REDIS_URL=redis_url,
            CELERY_BROKER_URL=redis_url,
            CELERY_RESULT_BACKEND=redis_url,
            DATABASE_URL=os.environ.get("BENCH_DATABASE_URL", NO_DATABASE),
            CONVEYOR_HOME=str(home / "conveyor"),
            CONVEYOR_ENV="dev",
        )
    env.update(system.extra_env)
    return env
