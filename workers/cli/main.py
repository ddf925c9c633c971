"""``conveyor``: the one command for operators and for services without Python.

conveyor dev                         the whole stack on this machine (embedded servers if
                                     REDIS_URL / DATABASE_URL are not set)
conveyor worker POOL [celery args]   one worker pool: ai, n8n, episodes, maintenance
conveyor beat [celery args]          the scheduler (celery-redbeat, lock-safe)
conveyor flower [flower args]        monitoring (authentication required outside dev mode)
conveyor gateway                     the HTTP API, its live events and the /ui page
conveyor gateway-key TENANT          make an API key for a tenant
conveyor migrate                     bring the database schema up to date
conveyor submit TASK --data JSON     enqueue a job; --wait for its result, --follow its events
conveyor cancel JOB_ID               ask a job to stop (queued or streaming)
conveyor status|result|events JOB_ID a job's status, its result, its events (replay + follow)
conveyor jobs [filters]              recent jobs, newest first (--tenant, --task, --status)
conveyor dead-letters list|show|retry|purge   inspect and re-submit what failed for good
conveyor episodes [filters]          episodes as JSON lines, newest first (--cursor pages on)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from conveyor.config import Env
from conveyor.errors import ConfigError

#: Exit codes of ``conveyor submit``, so scripts can tell outcomes apart.
EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3
EXIT_UNAVAILABLE = 4
#: ``conveyor worker|beat|flower|migrate`` on a malformed setting (EX_CONFIG, sysexits.h): the
#: dev stack's supervisor does not restart a process that exits with it.
EXIT_CONFIG = 78

#: Addresses only this machine can reach.
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("worker", "beat", "flower"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command != "dev":
        # A shell with nothing configured talks to the running `conveyor dev` stack, found from
        # any directory inside the project (or through CONVEYOR_HOME).
        from workers.dev.env import use_running_stack

        use_running_stack()
    try:
        return int(args.handler(args, rest) or 0)
    except ConfigError as exc:
        print(f"conveyor {args.command}: {exc}", file=sys.stderr)
        starts = ("worker", "beat", "flower", "gateway")
        return EXIT_CONFIG if args.command in starts else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="run the whole stack on this machine")
    dev.add_argument("--no-demo", action="store_true", help="do not submit the first job")
    dev.add_argument("--flower-port", type=int, default=5555)
    dev.set_defaults(handler=_dev)

    worker = commands.add_parser("worker", help="start one worker pool (extra args go to celery)")
    worker.add_argument("pool", help="ai, n8n, episodes or maintenance")
    worker.set_defaults(handler=_worker)

    beat = commands.add_parser("beat", help="start the scheduler (extra args go to celery)")
    beat.set_defaults(handler=_beat)

    flower = commands.add_parser("flower", help="start Flower (extra args go to flower)")
    flower.add_argument("--port", type=int, help="default: FLOWER_PORT, else 5555")
    flower.add_argument("--address", help="default: FLOWER_ADDRESS, else 127.0.0.1")
    flower.set_defaults(handler=_flower)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(handler=_migrate)

    submit = commands.add_parser("submit", help="enqueue a job and print its id")
    submit.add_argument("task", help="a public task name, e.g. ai.chat")
    submit.add_argument(
        "--data",
        default="{}",
        help="the payload: JSON, @FILE to read it from a file, or - for stdin",
    )
    submit.add_argument("--wait", action="store_true", help="print the result envelope")
    submit.add_argument("--follow", action="store_true", help="print each event as a JSON line")
    submit.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait (default 300)"
    )
    submit.add_argument("--idempotency-key")
    submit.add_argument("--priority", type=int, help="0 (served first) to 9")
    submit.add_argument("--countdown", type=float, help="seconds to wait before running")
    submit.set_defaults(handler=_submit)

    cancel = commands.add_parser("cancel", help="ask a job to stop")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=_cancel)

    episodes = commands.add_parser("episodes", help="print episodes as JSON lines, newest first")
    episodes.add_argument("--user", help="user_id")
    episodes.add_argument("--session", help="session_id")
    episodes.add_argument("--model", help="model_type")
    episodes.add_argument("--status", help="e.g. success")
    episodes.add_argument("--since", help="from this time (ISO 8601, or an age: 30m, 12h, 7d)")
    episodes.add_argument("--until", help="before this time (ISO 8601, or an age)")
    episodes.add_argument("--search", help="words in prompt or response (web-search syntax)")
    episodes.add_argument("--limit", type=int, default=50, help="episodes a page (1-1000)")
    episodes.add_argument("--cursor", help="the next_cursor a previous page printed")
    episodes.add_argument("--all", action="store_true", help="every page, not just one")
    episodes.set_defaults(handler=_episodes)

    from workers.cli import dead_letters as dead_letters_cli
    from workers.cli import gateway as gateway_cli
    from workers.cli import jobs as jobs_cli

    jobs_cli.register(commands)
    dead_letters_cli.register(commands)
    gateway_cli.register(commands)
    return parser


def _worker(args: argparse.Namespace, rest: list[str]) -> int:
    """One pool's worker, loading only that pool's task modules, after reading every setting
    it needs: a malformed one stops it here, in one line naming the variable."""
    from workers import settings
    from workers.pools import POOL_TASK_MODULES, worker_argv

    if args.pool not in POOL_TASK_MODULES:
        print(
            f"conveyor worker: unknown pool {args.pool!r}; pools: {', '.join(POOL_TASK_MODULES)}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    spec = settings.check_pool(args.pool)
    settings.set_current_pool(args.pool)
    from workers.app import app

    app.conf.include = POOL_TASK_MODULES[args.pool]
    app.worker_main([*worker_argv(spec), *rest])
    return 0


def _beat(args: argparse.Namespace, rest: list[str]) -> int:
    from workers import settings
    from workers.app import app

    app.conf.include = ()  # beat sends by name: it needs no task code
    app.conf.redbeat_redis_url = settings.core().beat_redis_url
    # Flower learns of beat's jobs from the worker that runs them (or not at all, for the
    # frequent housekeeping that sends no events: tasks/maintenance.py).
    app.conf.task_send_sent_event = False
    app.start(["beat", "--loglevel=INFO", *rest])
    return 0


def _flower(args: argparse.Namespace, rest: list[str]) -> int:
    from workers import settings
    from workers.app import app

    env = Env()
    port = args.port or env.integer("FLOWER_PORT", 5555, minimum=1)
    address = args.address or env.text("FLOWER_ADDRESS", "127.0.0.1") or "127.0.0.1"
    args.address = address
    for n, arg in enumerate(rest):  # an --address among the extra args wins, as in Flower
        if arg.startswith("--address="):
            address = arg.split("=", 1)[1]
        elif arg == "--address" and n + 1 < len(rest):
            address = rest[n + 1]
    flower_args = [f"--port={port}", f"--address={address}"]
    has_auth = settings.flower_authenticated()
    if settings.core().env != "dev" and not has_auth:
        print(
            "conveyor flower: set FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH with an "
            "OAuth provider) outside dev mode (CONVEYOR_ENV=dev)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if not has_auth and address not in _LOOPBACK:
        print(
            f"conveyor flower: without authentication Flower listens on localhost only, not "
            f"{address!r}: set FLOWER_BASIC_AUTH to listen there",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if not has_auth:  # dev mode, bound to localhost: let dashboards and tests use the API
        settings.allow_unauthenticated_flower_api()
    app.conf.include = ()  # Flower reads task events: it needs no task code
    app.start(["flower", *flower_args, *rest])
    return 0


def _migrate(args: argparse.Namespace, rest: list[str]) -> int:
    from workers import settings
    from workers.store.migrate import upgrade

    upgrade(settings.core().database_url, args.revision)
    print(f"database at {args.revision}")
    return 0


def _dev(args: argparse.Namespace, rest: list[str]) -> int:
    from workers.dev.stack import run_dev_stack

    return run_dev_stack(demo=not args.no_demo, flower_port=args.flower_port)


def _submit(args: argparse.Namespace, rest: list[str]) -> int:
    import redis
    from celery.exceptions import BackendError

    from conveyor import ConveyorError, PayloadError, UnknownTaskError
    from conveyor.schemas.storable import MAX_DEPTH

    try:
        payload = _read_payload(args.data)
    except ValueError as exc:
        print(f"conveyor submit: --data is not valid JSON: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RecursionError:
        print(
            f"conveyor submit: --data is nested too deeply (at most {MAX_DEPTH} levels)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    submitter = _submitter()
    try:
        job = submitter.submit(
            args.task,
            payload,
            idempotency_key=args.idempotency_key,
            priority=args.priority,
            countdown=args.countdown,
        )
    except (PayloadError, UnknownTaskError, ValueError) as exc:
        print(f"conveyor submit: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConveyorError as exc:
        print(f"conveyor submit: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(job.id, flush=True)
    if not (args.wait or args.follow):
        return EXIT_OK
    deadline = time.monotonic() + args.timeout  # one budget for the events and the result
    watch = threading.Timer(_UNSTARTED_S, _warn_if_nobody_consumes, (submitter, job, args.task))
    watch.daemon = True
    watch.start()
    try:
        if args.follow:
            for event in job.events(timeout=args.timeout):
                _print_json(event)
        envelope = job.result(timeout=max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        print(
            f"conveyor submit: job {job.id} did not finish within {args.timeout:g} s",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    except (redis.RedisError, OSError, RuntimeError, BackendError) as exc:
        # RuntimeError: Celery's result consumer gave up reconnecting; its own words ("the
        # Celery application must be restarted") would mislead a caller of this command.
        why = "it did not come back" if isinstance(exc, RuntimeError) else str(exc)
        print(
            f"conveyor submit: lost Redis while waiting for job {job.id} ({why}); the job "
            "itself is not affected",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    finally:
        watch.cancel()
    if args.wait:
        _print_json(envelope)
    return EXIT_OK if envelope["success"] else EXIT_JOB_FAILED


#: Seconds a waited-on job may sit unstarted before the CLI looks for a worker of its queue.
_UNSTARTED_S = 3.0


def _warn_if_nobody_consumes(submitter: Any, job: Any, task: str) -> None:
    """Say so when no running worker consumes the job's queue: it waits until one does (a
    stack not started yet, another Redis than the workers')."""
    from conveyor import keys
    from conveyor.names import queue_for

    try:
        if submitter.redis.exists(keys.events_stream(job.id)):
            return  # started
        queue = queue_for(task)
        replies = submitter.app.control.inspect(timeout=1.0).active_queues() or {}
        consumed = {q.get("name") for queues in replies.values() for q in queues or ()}
        if queue not in consumed:
            print(
                f"conveyor submit: no running worker consumes the {queue!r} queue on this "
                f"broker; job {job.id} waits until one does (`conveyor worker {queue}`)",
                file=sys.stderr,
                flush=True,
            )
    except Exception:  # a hint only: never fail the wait over it
        return


def _cancel(args: argparse.Namespace, rest: list[str]) -> int:
    """Exit 0 when the stop was asked for, 1 when the job had already finished."""
    state = _submitter().cancel(args.job_id)
    if state == "finished":
        print(
            f"conveyor cancel: job {args.job_id} already finished: nothing to cancel",
            file=sys.stderr,
        )
        return EXIT_JOB_FAILED
    if state == "running":
        print(f"cancel requested for {args.job_id} (running: it stops shortly)")
    else:
        print(
            f"cancel requested for {args.job_id} (not started: queued, or unknown to this "
            "broker; it is skipped if it comes up)"
        )
    return EXIT_OK


def _episodes(args: argparse.Namespace, rest: list[str]) -> int:
    """Episodes on stdout, one JSON object a line; the next page's cursor on stderr as
    ``{"next_cursor": ...}`` (none after the last page)."""
    import sqlalchemy.exc

    from workers.runtime.connections import engine
    from workers.store.episodes import BadCursor, parse_time, query_episodes

    try:
        filters = {
            "user_id": args.user,
            "session_id": args.session,
            "model_type": args.model,
            "status": args.status,
            "search": args.search,
            "since": parse_time(args.since) if args.since else None,
            "until": parse_time(args.until) if args.until else None,
        }
        cursor = args.cursor
        while True:
            page = query_episodes(engine(), limit=args.limit, cursor=cursor, **filters)
            for episode in page.episodes:
                _print_json(episode)
            cursor = page.next_cursor
            if cursor is None or not args.all:
                break
    except (BadCursor, ValueError) as exc:
        print(f"conveyor episodes: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except sqlalchemy.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"conveyor episodes: the database is unreachable: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if cursor is not None:
        print(json.dumps({"next_cursor": cursor}), file=sys.stderr)
    return EXIT_OK


def _submitter() -> Any:
    """A ``Submitter`` from the environment; says on stderr where it submits when nothing
    configured a broker and no dev stack was found (the default may be another Redis)."""
    from conveyor import Submitter
    from conveyor.config import ClientConfig, redact_url

    config = ClientConfig.from_env()
    if not config.configured:
        print(
            f"conveyor: no REDIS_URL set and no running `conveyor dev` found; using the "
            f"default broker {redact_url(config.broker_url)}",
            file=sys.stderr,
        )
    return Submitter(config)


def _read_payload(data: str) -> Any:
    if data == "-":
        data = sys.stdin.read()
    elif data.startswith("@"):
        with open(data[1:], encoding="utf-8") as f:
            data = f.read()
    return json.loads(data)


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)
