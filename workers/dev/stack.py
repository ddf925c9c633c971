"""``conveyor dev``: the whole stack on one machine that has nothing but Python.

Without REDIS_URL / DATABASE_URL it starts embedded Valkey and PostgreSQL with their data in
``CONVEYOR_HOME`` (``.conveyor/``, kept across restarts); then it migrates, starts one worker
per pool, beat and Flower, submits a first job and follows it, and supervises everything until
Ctrl-C or SIGTERM, when it stops every process it started.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

from conveyor.config import Env
from conveyor.names import MAINTENANCE
from workers.dev.env import child_environment, conveyor_home, dev_env_path, write_dev_env

_PREFERRED_REDIS_PORT = 16379
_PREFERRED_FLOWER_PORT = 5555
_PREFERRED_GATEWAY_PORT = 8000
#: Smaller pools than production's defaults: a laptop, not a fleet.
_DEV_DEFAULTS = {
    "CONVEYOR_ENV": "dev",
    "CONVEYOR_AI_CONCURRENCY": "8",
    "CONVEYOR_N8N_CONCURRENCY": "4",
    "CONVEYOR_EPISODES_CONCURRENCY": "1",
}


def say(message: str) -> None:
    print(f"[conveyor {time.strftime('%H:%M:%S')}] {message}", flush=True)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    # One stop is enough: a second signal (make forwards its own SIGTERM, ^C twice) must not
    # cut the clean-up short. run_dev_stack restores the handlers when it is done.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop()


def run_dev_stack(*, demo: bool = True, flower_port: int = _PREFERRED_FLOWER_PORT) -> int:
    from workers.dev.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
    from workers.dev.supervisor import Supervisor

    started = time.monotonic()
    home = conveyor_home().resolve()
    home.mkdir(parents=True, exist_ok=True)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    servers: list[Any] = []
    supervisor = Supervisor(report=say)
    try:
        env = Env()
        redis_url = env.text("REDIS_URL")
        if not redis_url:
            embedded_redis = EmbeddedRedis(home / "valkey", port=_PREFERRED_REDIS_PORT)
            servers.append(embedded_redis)
            redis_url = embedded_redis.start()
            say(f"embedded Valkey at {redis_url} (data in {home / 'valkey'})")
        database_url = env.text("DATABASE_URL")
        if not database_url:
            embedded_pg = EmbeddedPostgres(home / "postgres")
            servers.append(embedded_pg)
            embedded_pg.start()
            database_url = embedded_pg.create_database("conveyor")
            say(f"embedded PostgreSQL at {database_url}")

        gateway_port = free_port(_PREFERRED_GATEWAY_PORT)
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        child_env = child_environment(_DEV_DEFAULTS, REDIS_URL=redis_url, DATABASE_URL=database_url)
        write_dev_env(redis_url, database_url, gateway_url)

        from workers.store.migrate import upgrade

        upgrade(database_url)
        say("database migrated")

        from workers.pools import pool_names

        python = [sys.executable, "-m", "workers.cli"]
        logs = home / "logs"
        for pool in pool_names():
            supervisor.add(
                f"worker-{pool}",
                [*python, "worker", pool, "--loglevel=INFO"],
                log_path=logs / f"worker-{pool}.log",
                env=child_env,
            )
        supervisor.add("beat", [*python, "beat"], log_path=logs / "beat.log", env=child_env)
        flower_port = free_port(flower_port)
        supervisor.add(
            "flower",
            [*python, "flower", f"--port={flower_port}"],
            log_path=logs / "flower.log",
            env=child_env,
        )
        supervisor.add(
            "gateway",
            [*python, "gateway", f"--port={gateway_port}"],
            log_path=logs / "gateway.log",
            env=child_env,
        )
        say(f"started {len(supervisor.children)} processes; logs in {logs}")
        ready = _wait_for_workers(supervisor, logs, timeout_s=90)
        say(
            f"Flower: http://127.0.0.1:{flower_port}  (dev mode: no authentication, localhost only)"
        )
        say(f"gateway: {gateway_url}/api/v1  (API docs {gateway_url}/docs)")
        say(f"live page: {gateway_url}/ui/  (the first job shows there)")
        if demo and MAINTENANCE in ready:
            _first_job(started)
        elif demo:
            say("the maintenance pool is not running: no first job")
        say(
            f"in another shell: conveyor submit maintenance.ping --wait   "
            f"(it finds this stack through {dev_env_path()})"
        )
        say("Ctrl-C stops everything")
        while True:
            supervisor.check()
            time.sleep(0.5)
    except _Stop:
        say("stopping")
        return 0
    finally:
        # No second signal may interrupt the clean-up: that is how strays are left behind.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        supervisor.stop_all()
        for server in reversed(servers):
            server.stop()
        dev_env_path().unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        say("stopped")


def _wait_for_workers(supervisor: Any, logs: Path, *, timeout_s: float) -> list[str]:
    """Until every worker says it is ready (it consumes from then on) or cannot start; the
    pools that are ready."""
    workers = [c for c in supervisor.children if c.name.startswith("worker-")]
    pending = {c.name for c in workers}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        supervisor.check()
        for child in workers:
            if child.name not in pending:
                continue
            if child.failed is not None or " ready." in child.log_text():
                pending.discard(child.name)
        time.sleep(0.2)
    failed = [c for c in workers if c.failed is not None]
    ready = [c.name for c in workers if c.failed is None and c.name not in pending]
    if pending:
        say(f"still waiting for {', '.join(sorted(pending))}: see their logs in {logs}")
    for child in failed:
        say(f"{child.name} FAILED to start: {child.failed}")
    if not pending and not failed:
        say("all worker pools ready")
    elif ready:
        say(f"ready: {', '.join(sorted(ready))}")
    return [name.removeprefix("worker-") for name in ready]


def _first_job(started: float) -> None:
    """Submit maintenance.ping, show its events as they come, then its result."""
    from conveyor import Submitter

    submitter = Submitter()
    try:
        job = submitter.submit(
            "maintenance.ping", {"message": "hello from conveyor dev", "hold_s": 2}
        )
        say(f"first job {job.id} (maintenance.ping); its events:")
        for event in job.events(timeout=60):
            print(f"    {event['event']:<22} seq={event['seq']} {event['data']}", flush=True)
        envelope = job.result(timeout=60)
        say(f"result: {envelope}")
        say(f"command to first job done: {time.monotonic() - started:.1f}s")
    finally:
        submitter.close()
