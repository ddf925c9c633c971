"""``conveyor status|result|events|jobs``: the twins of the gateway's job routes, for an
operator's shell (every tenant's jobs unless ``--tenant``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

#: Exit codes, as ``conveyor submit`` has them.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4


def register(commands: Any) -> None:
    status = commands.add_parser("status", help="a job's status (exit 1: unknown)")
    status.add_argument("job_id")
    status.set_defaults(handler=_status)

    result = commands.add_parser("result", help="a job's result envelope, once it ended")
    result.add_argument("job_id")
    result.add_argument("--wait", action="store_true", help="wait for the job to end")
    result.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    result.set_defaults(handler=_result)

    events = commands.add_parser(
        "events", help="a job's events as JSON lines: replay, then follow until it ends"
    )
    events.add_argument("job_id")
    events.add_argument("--from-seq", type=int, default=0, help="start after this seq")
    events.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    events.set_defaults(handler=_events)

    jobs = commands.add_parser("jobs", help="recent jobs as JSON lines, newest first")
    jobs.add_argument("--tenant", help="only this tenant's (default: everyone's)")
    jobs.add_argument("--task", help="only this task")
    jobs.add_argument("--status", help="queued|running|retrying|succeeded|failed|cancelled")
    jobs.add_argument("--since", help="ISO 8601, or an age: 30m, 12h, 7d")
    jobs.add_argument("--until", help="ISO 8601, or an age")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (1-500)")
    jobs.set_defaults(handler=_jobs)


def _print(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def _submitter() -> Any:
    from workers.cli.main import _submitter as make

    return make()


def _lookup(submitter: Any, job_id: str) -> tuple[Any, dict[str, Any] | None]:
    from conveyor import jobindex

    [entry] = jobindex.lookup(submitter.redis, [job_id])
    [meta] = submitter.states([job_id])
    return entry, meta


def _unavailable(command: str, exc: Exception) -> int:
    print(f"conveyor {command}: Redis is unreachable: {exc}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def _status(args: argparse.Namespace, rest: list[str]) -> int:
    import redis

    from conveyor.jobstatus import job_view, status_of

    submitter = _submitter()
    try:
        entry, meta = _lookup(submitter, args.job_id)
    except redis.RedisError as exc:
        return _unavailable("status", exc)
    if entry is None:
        if meta is None:
            print(f"conveyor status: no job {args.job_id} (or it expired)", file=sys.stderr)
            return EXIT_FAILED
        # Sent by beat or straight through Celery: no index entry, but a state.
        _print({"job_id": args.job_id, "status": status_of(meta)})
        return EXIT_OK
    view = job_view(entry, meta)
    view["tenant"] = entry.tenant
    _print(view)
    return EXIT_OK


def _result(args: argparse.Namespace, rest: list[str]) -> int:
    """Exit 0 when the job succeeded, 1 when it failed (or is unknown), 3 when it has not
    ended (with ``--wait``: not within ``--timeout``)."""
    import redis

    from conveyor.jobstatus import result_of

    submitter = _submitter()
    try:
        if args.wait:
            try:
                envelope = submitter.job(args.job_id).result(timeout=args.timeout)
            except TimeoutError:
                print(f"conveyor result: job {args.job_id} did not end in time", file=sys.stderr)
                return EXIT_TIMEOUT
        else:
            entry, meta = _lookup(submitter, args.job_id)
            envelope = result_of(args.job_id, meta, entry.request_id if entry else None)
            if envelope is None:
                known = entry is not None or meta is not None
                print(
                    f"conveyor result: job {args.job_id} has not ended"
                    if known
                    else f"conveyor result: no job {args.job_id} (or it expired)",
                    file=sys.stderr,
                )
                return EXIT_TIMEOUT if known else EXIT_FAILED
    except redis.RedisError as exc:
        return _unavailable("result", exc)
    _print(envelope)
    return EXIT_OK if envelope["success"] else EXIT_FAILED


def _events(args: argparse.Namespace, rest: list[str]) -> int:
    """Exit 0 after the terminal event, 3 when ``--timeout`` passed first."""
    import redis

    from conveyor.envelopes import TERMINAL_TYPES

    if args.from_seq < 0:
        print("conveyor events: --from-seq must be 0 or more", file=sys.stderr)
        return EXIT_BAD_INPUT
    submitter = _submitter()
    try:
        for event in submitter.job(args.job_id).events(
            timeout=args.timeout, from_seq=args.from_seq
        ):
            _print(event)
            if event.get("type") in TERMINAL_TYPES:
                return EXIT_OK
    except redis.RedisError as exc:
        return _unavailable("events", exc)
    print(f"conveyor events: job {args.job_id} did not end in time", file=sys.stderr)
    return EXIT_TIMEOUT


def _jobs(args: argparse.Namespace, rest: list[str]) -> int:
    import redis

    from conveyor.jobstatus import STATUSES
    from workers.operations.jobs import recent_jobs
    from workers.store.episodes import parse_time

    if args.status is not None and args.status not in STATUSES:
        print(f"conveyor jobs: --status must be one of {', '.join(STATUSES)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not 1 <= args.limit <= 500:
        print("conveyor jobs: --limit must be from 1 to 500", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        since = int(parse_time(args.since).timestamp() * 1000) if args.since else None
        until = int(parse_time(args.until).timestamp() * 1000) if args.until else None
    except ValueError as exc:
        print(f"conveyor jobs: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    submitter = _submitter()
    try:
        found = recent_jobs(
            submitter,
            args.tenant,
            task=args.task,
            status=args.status,
            since_ms=since,
            until_ms=until,
            limit=args.limit,
        )
    except redis.RedisError as exc:
        return _unavailable("jobs", exc)
    for view in found:
        _print(view)
    return EXIT_OK
