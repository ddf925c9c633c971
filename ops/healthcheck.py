"""Health checks for Conveyor's processes that prove work moves, not only that a process lives.

    python ops/healthcheck.py worker POOL    liveness of one worker: answers, and consumes
    python ops/healthcheck.py beat           the scheduler is ticking (redbeat schedule not late)
    python ops/healthcheck.py metrics        queue metrics are fresh (beat + maintenance pool work)

Exit status: 0 healthy, 1 unhealthy (the reason on stderr), 2 bad usage or configuration.
It reads the same environment as the process it checks (REDIS_URL, CELERY_BROKER_URL, ...).

Why more than ``celery inspect ping``: a worker can reconnect to Redis and answer remote-control
pings while no longer taking jobs off its queue (celery#8030, #8091, #9054, #10205). A ping
proves the control channel, not consumption. ``worker`` therefore also compares the pool's
backlog with the worker's own count of started jobs (``inspect stats``: ``total``, which
includes batched messages): a worker that has a free slot while jobs wait in its queue, and has
started nothing for ``--stall-after`` seconds (default 2 x CONVEYOR_RETRY_CAP + 60 = 300), is
stuck. Keeping that count between runs needs a small state file (``--state-dir``, default /tmp).

A liveness probe must not restart healthy processes for someone else's outage: when Redis
itself cannot be reached, ``worker`` and ``beat`` report healthy (with a warning), because a
restart cannot bring Redis back and would only interrupt running jobs. ``metrics`` is for
alerting, not for restarting, so it does fail then.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

HEALTHY, UNHEALTHY, USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.split("\n\n")[0])
    checks = parser.add_subparsers(dest="check", required=True)

    worker = checks.add_parser("worker", help="one worker answers and consumes its pool's queue")
    worker.add_argument("pool", help="ai, n8n, episodes or maintenance")
    worker.add_argument(
        "--hostname",
        help="the worker's node name (default: POOL@<this host>, as `conveyor worker` names it)",
    )
    worker.add_argument(
        "--stall-after",
        type=float,
        help="seconds with jobs waiting, a free slot and no job started before it is stuck "
        "(default: 2 x CONVEYOR_RETRY_CAP + 60, i.e. 300)",
    )
    worker.add_argument("--state-dir", default=tempfile.gettempdir())
    worker.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for replies")

    beat = checks.add_parser("beat", help="the redbeat schedule is not running late")
    beat.add_argument("--max-lag", type=float, default=60.0, help="seconds an entry may be overdue")

    metrics = checks.add_parser("metrics", help="conveyor:metrics:queues was written recently")
    metrics.add_argument("--max-age", type=float, default=60.0, help="seconds")

    args = parser.parse_args(argv)
    try:
        return {"worker": check_worker, "beat": check_beat, "metrics": check_metrics}[args.check](
            args
        )
    except _Usage as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return USAGE


class _Usage(Exception):
    pass


def _app():
    try:
        from workers.app import app
    except Exception as exc:  # a ConfigError names the bad variable
        raise _Usage(f"cannot load the Celery app: {exc}") from exc
    return app


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def _unreachable(what: str, exc: Exception) -> int:
    print(
        f"healthcheck: WARNING {what} unreachable, not judging this process: {exc}", file=sys.stderr
    )
    return HEALTHY


def check_worker(args: argparse.Namespace) -> int:
    import redis

    from conveyor.names import QUEUES
    from workers import settings
    from workers.observability.queues import queue_keys

    app = _app()
    if args.pool not in QUEUES:
        raise _Usage(f"unknown pool {args.pool!r}; pools: {', '.join(QUEUES)}")
    node = args.hostname or f"{args.pool}@{socket.gethostname()}"
    options = app.conf.broker_transport_options
    lists = [
        key
        for queue in settings.pool(args.pool).queues
        for key in queue_keys(queue, options["priority_steps"], options["sep"])
    ]

    # The backlog lives on the broker (which may differ from REDIS_URL).
    try:
        broker = _redis(app.conf.broker_url)
        pipe = broker.pipeline(transaction=False)
        for key in lists:
            pipe.llen(key)
        backlog = sum(pipe.execute())
    except redis.RedisError as exc:
        return _unreachable("broker", exc)

    inspect = app.control.inspect(destination=[node], timeout=args.timeout)
    stats = (inspect.stats() or {}).get(node)
    if stats is None:
        print(
            f"healthcheck: worker {node} did not answer within {args.timeout:g}s "
            f"(backlog {backlog})",
            file=sys.stderr,
        )
        return UNHEALTHY

    # Longer than the longest backoff between two attempts: a batched pool (episodes) retrying
    # a batch through a Postgres outage starts nothing in between, and is not stuck.
    stall_after = args.stall_after
    if stall_after is None:
        stall_after = 2 * settings.core().retry_cap_s + 60
    started = sum((stats.get("total") or {}).values())
    slots = int((stats.get("pool") or {}).get("max-concurrency") or 1)
    state_file = Path(args.state_dir) / f"conveyor-health-{node.replace('@', '_')}.json"
    now = time.time()
    previous = _read_state(state_file)

    progressed = previous is None or previous.get("started") != started
    if backlog == 0 or progressed:
        _write_state(state_file, {"started": started, "since": now})
        return HEALTHY

    active = len((inspect.active() or {}).get(node) or [])
    if active >= slots:  # every slot busy: nothing new can start, and that is fine
        _write_state(state_file, {"started": started, "since": now})
        return HEALTHY

    stalled_for = now - float(previous.get("since", now))
    if stalled_for >= stall_after:
        print(
            f"healthcheck: worker {node} is not consuming: {backlog} job(s) waiting in "
            f"{', '.join(lists)}, {slots - active} free slot(s), no job started for "
            f"{stalled_for:.0f}s",
            file=sys.stderr,
        )
        return UNHEALTHY
    return HEALTHY


def check_beat(args: argparse.Namespace) -> int:
    import redis

    from workers import settings

    app = _app()
    schedule_key = app.conf.redbeat_key_prefix + ":schedule"  # redbeat: <prefix> + ":schedule"
    try:
        client = _redis(settings.core().beat_redis_url)
        oldest = client.zrangebyscore(schedule_key, 0, "+inf", start=0, num=1, withscores=True)
        lock_ttl = client.pttl(app.conf.redbeat_key_prefix + ":lock")
    except redis.RedisError as exc:
        return _unreachable("beat's Redis", exc)
    if not oldest:
        print(f"healthcheck: no schedule in {schedule_key}: beat has not started", file=sys.stderr)
        return UNHEALTHY
    lag = time.time() - oldest[0][1]
    if lag > args.max_lag:
        print(
            f"healthcheck: beat is {lag:.0f}s late on {oldest[0][0].decode()} "
            f"(lock {'held' if lock_ttl > 0 else 'free'})",
            file=sys.stderr,
        )
        return UNHEALTHY
    return HEALTHY


def check_metrics(args: argparse.Namespace) -> int:
    import redis

    from conveyor import keys
    from workers import settings

    try:
        written = _redis(settings.core().redis_url).hget(keys.QUEUE_METRICS, "at")
    except redis.RedisError as exc:
        print(f"healthcheck: Redis unreachable: {exc}", file=sys.stderr)
        return UNHEALTHY
    if written is None:
        print(f"healthcheck: {keys.QUEUE_METRICS} has never been written", file=sys.stderr)
        return UNHEALTHY
    age = time.time() - float(written)
    if age > args.max_age:
        print(
            f"healthcheck: {keys.QUEUE_METRICS} is {age:.0f}s old: beat or the maintenance "
            "pool is not working",
            file=sys.stderr,
        )
        return UNHEALTHY
    return HEALTHY


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(state))
        tmp.replace(path)
    except OSError as exc:  # a read-only /tmp must not fail the check; it only loses memory
        print(f"healthcheck: WARNING cannot keep state in {path}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
