"""conveyor dead-letters: the operator's view of the jobs that failed for good.

conveyor dead-letters list [filters]            JSON lines, newest first
conveyor dead-letters show JOB_ID               one dead letter with its payload
conveyor dead-letters retry [JOB_ID] [filters]  submit again (--dry-run: say what would go)
conveyor dead-letters purge --before TIME       how many would go; --yes deletes them

Every tenant's dead letters unless --tenant. Exit codes as conveyor submit's: 0 done,
1 nothing found, 2 bad input (or a payload the submitter refuses), 4 database or broker
unreachable.
"""

# Imported by ``conveyor``'s parser whatever the command: the database, the store and the
# operations are imported only when a subcommand runs, so a client-only install (no `worker`
# extra) still runs ``conveyor submit``.

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from workers.cli.main import EXIT_BAD_INPUT, EXIT_JOB_FAILED, EXIT_OK, EXIT_UNAVAILABLE

#: ``conveyor submit``'s 1 ("the job failed") is "nothing found" here.
EXIT_NOTHING = EXIT_JOB_FAILED

_TIME_HELP = "ISO 8601, or an age: 30m, 12h, 7d"


def register(commands: Any) -> None:
    """Add the ``dead-letters`` group to ``conveyor``'s subcommands."""
    group = commands.add_parser(
        "dead-letters",
        help="inspect, resubmit and purge dead letters (every tenant's unless --tenant)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="dead letters as JSON lines, newest first")
    _filters(listing)
    listing.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    listing.set_defaults(handler=_guarded(_list))

    show = actions.add_parser("show", help="one dead letter, with its payload")
    show.add_argument("job_id")
    show.add_argument("--tenant", help="only if it is this tenant's")
    show.set_defaults(handler=_guarded(_show))

    retry = actions.add_parser(
        "retry", help="submit dead letters again: one by its job id, or those the filters match"
    )
    retry.add_argument("job_id", nargs="?", help="the dead letter's job id")
    _filters(retry)
    retry.add_argument("--limit", type=int, default=1000, help="at most this many, oldest first")
    retry.add_argument("--dry-run", action="store_true", help="say what would go; send nothing")
    retry.set_defaults(handler=_guarded(_retry))

    purge = actions.add_parser("purge", help="delete dead letters that failed before a time")
    purge.add_argument("--before", required=True, help=f"failed before this time ({_TIME_HELP})")
    purge.add_argument("--tenant", help="only this tenant's")
    purge.add_argument("--yes", action="store_true", help="delete (without it: only count)")
    purge.set_defaults(handler=_guarded(_purge))


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help="e.g. ai.chat")
    parser.add_argument("--reason", help="exhausted, permanent, poison, delivery_limit, …")
    parser.add_argument("--since", help=f"failed from this time ({_TIME_HELP})")
    parser.add_argument("--until", help=f"failed before this time ({_TIME_HELP})")
    parser.add_argument("--tenant", help="only this tenant's")


Handler = Callable[[argparse.Namespace], int]


def _guarded(handler: Handler) -> Callable[[argparse.Namespace, list[str]], int]:
    """Every failure as one line on stderr and its exit code, never a traceback."""

    def run(args: argparse.Namespace, rest: list[str]) -> int:
        import sqlalchemy.exc

        from conveyor.errors import ConveyorError

        try:
            return handler(args)
        except ValueError as exc:  # a time, a limit, a job id with filters
            return _fail(args, str(exc), EXIT_BAD_INPUT)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            return _fail(args, f"the database is unreachable: {reason}", EXIT_UNAVAILABLE)
        except ConveyorError as exc:  # the broker, while resubmitting
            return _fail(args, str(exc), EXIT_UNAVAILABLE)

    return run


def _list(args: argparse.Namespace) -> int:
    from workers.runtime.connections import engine
    from workers.store.dead_letters import list_dead_letters

    rows = list_dead_letters(engine(), limit=args.limit, **_filter_values(args))
    for row in rows:
        _print_json(row)
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from workers.runtime.connections import engine
    from workers.store.dead_letters import get_dead_letter

    row = get_dead_letter(engine(), args.job_id, tenant=args.tenant)
    if row is None:
        return _fail(args, f"no dead letter with job id {args.job_id}", EXIT_NOTHING)
    print(json.dumps(row, ensure_ascii=False, indent=2), flush=True)
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    """One JSON line per dead letter; 2 when the submitter refused any payload (the lines say
    which; the others went), 1 when there was nothing to send."""
    from workers.cli.main import _submitter
    from workers.operations.dead_letters import (
        AlreadyResubmitted,
        DeadLetterNotFound,
        retry_dead_letters,
    )
    from workers.runtime.connections import engine

    try:
        lines = retry_dead_letters(
            engine(),
            _submitter(),  # a dry run uses its payload checks only
            job_id=args.job_id,
            dry_run=args.dry_run,
            limit=args.limit,
            **_filter_values(args),
        )
    except (DeadLetterNotFound, AlreadyResubmitted) as exc:
        return _fail(args, str(exc), EXIT_NOTHING)
    for line in lines:
        _print_json(line)
    if not lines:
        return _fail(args, "no dead letters to resubmit", EXIT_NOTHING)
    if any(line["status"] == "refused" for line in lines):
        return EXIT_BAD_INPUT
    return EXIT_OK


def _purge(args: argparse.Namespace) -> int:
    from conveyor.envelopes import iso_ms
    from workers.runtime.connections import engine
    from workers.store.dead_letters import purge_dead_letters
    from workers.store.episodes import parse_time

    before = parse_time(args.before)  # once: "7d" is the same instant in both messages
    count = purge_dead_letters(engine(), before=before, tenant=args.tenant, dry_run=not args.yes)
    whose = f" of tenant {args.tenant}" if args.tenant is not None else ""
    what = f"{count} dead letter{'' if count == 1 else 's'}{whose} failed before {iso_ms(before)}"
    if count == 0:
        return _fail(args, f"no dead letters{whose} failed before {iso_ms(before)}", EXIT_NOTHING)
    if args.yes:
        print(f"purged {what}", flush=True)
    else:
        print(f"{what}: run again with --yes to delete them", flush=True)
    return EXIT_OK


def _filter_values(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tenant": args.tenant,
        "task": args.task,
        "reason": args.reason,
        "since": args.since,
        "until": args.until,
    }


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"conveyor dead-letters {args.action}: {message}", file=sys.stderr, flush=True)
    return code


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)
