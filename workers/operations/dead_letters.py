"""Sending dead letters again: ``conveyor dead-letters retry`` and ``POST
/api/v1/dead-letters/retry`` both come here.

Each dead letter goes out again at most once, however many operators (or gateway processes)
retry it at the same moment: its row is claimed by a conditional ``UPDATE`` before its job is
submitted, and put back if the submit fails. The submitter picks the new job's id, so the claim
holds a token (``resubmitting:…``) that the new id replaces once the job is sent; a process that
dies in between leaves the token visible in ``resubmitted_job_id``, and the row is not sent again
by itself (inspect it, then clear ``resubmitted_at`` to allow it).

A dead letter's payload may be the very reason it died: what the submitter refuses is reported
for that row (``"status": "refused"``) and the row put back, while the rest of a batch goes on.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import Engine

from conveyor.errors import PayloadError, UnknownTaskError
from conveyor.submitter import Origin, Submitter
from workers.store import dead_letters
from workers.store.dead_letters import When

log = logging.getLogger(__name__)

#: What ``resubmitted_job_id`` holds while a retry is sending the job.
CLAIM_PREFIX = "resubmitting:"


class AlreadyResubmitted(Exception):
    """The dead letter asked for by its id was sent again already, or is being sent right now
    (the gateway's 409). ``resubmitted_job_id`` is the new job's id (None while being sent)."""

    def __init__(self, job_id: str, resubmitted_job_id: str | None, resubmitted_at: str | None):
        self.job_id = job_id
        self.resubmitted_at = resubmitted_at
        if resubmitted_job_id is not None and resubmitted_job_id.startswith(CLAIM_PREFIX):
            resubmitted_job_id = None
        self.resubmitted_job_id = resubmitted_job_id
        if resubmitted_job_id is None:
            message = f"dead letter {job_id} is being resubmitted (since {resubmitted_at})"
        else:
            message = (
                f"dead letter {job_id} was already resubmitted as job {resubmitted_job_id} "
                f"(at {resubmitted_at})"
            )
        super().__init__(message)


class DeadLetterNotFound(LookupError):
    """No dead letter with this id, or it is another tenant's (the two look alike: a 404)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no dead letter with job id {job_id}")

    def __str__(self) -> str:  # LookupError would quote the whole message
        return str(self.args[0])


def retry_dead_letters(
    engine: Engine,
    submitter: Submitter,
    *,
    tenant: str | None,
    job_id: str | None = None,
    task: str | None = None,
    reason: str | None = None,
    since: When | None = None,
    until: When | None = None,
    dry_run: bool = False,
    limit: int = 1000,
    request_id: str | None = None,
    traceparent: str | None = None,
) -> list[dict[str, Any]]:
    """Submit again the dead letters not resubmitted yet: the one ``job_id`` names, or those
    the filters match (oldest first, at most ``limit``). ``tenant`` None is the operator's
    view (every tenant's); each job goes out for its own dead letter's tenant, with
    ``request_id`` / ``traceparent`` (the retrying request's) and ``retry_of`` its dead letter.

    One dict per dead letter: ``{"dead_letter", "task", "job_id", "status"}``, status
    ``resubmitted`` (``job_id`` the new job), ``would resubmit`` (``dry_run``: nothing is
    changed or sent) or ``refused`` (the submitter refuses the payload; with ``error``; the row
    stays resubmittable). A dead letter another retry claims first is left out.

    Raises ``DeadLetterNotFound`` / ``AlreadyResubmitted`` for a ``job_id`` that is not there /
    was sent again; ``ValueError`` for a time that cannot be read, or a ``job_id`` with filters.
    A submit that fails otherwise (broker unreachable: ``ConveyorError``) puts its row back
    and raises; the rows resubmitted before it stay so, and running the same retry again goes on
    with the rest.
    """
    if job_id is not None:
        if any(value is not None for value in (task, reason, since, until)):
            raise ValueError("retry either one dead letter by its job id, or those filters match")
        row = dead_letters.get_dead_letter(engine, job_id, tenant=tenant)
        if row is None:
            raise DeadLetterNotFound(job_id)
        if row["resubmitted_at"] is not None:
            raise AlreadyResubmitted(job_id, row["resubmitted_job_id"], row["resubmitted_at"])
        candidates = [row]
    else:
        candidates = dead_letters.resubmittable(
            engine, tenant=tenant, task=task, reason=reason, since=since, until=until, limit=limit
        )
    results = []
    for row in candidates:
        if dry_run:
            results.append(_check(engine, submitter, row))
            continue
        done = _resend(engine, submitter, row["job_id"], request_id, traceparent)
        if done is not None:
            results.append(done)
        elif job_id is not None:  # another retry claimed it since we looked
            again = dead_letters.get_dead_letter(engine, job_id, tenant=tenant) or row
            raise AlreadyResubmitted(job_id, again["resubmitted_job_id"], again["resubmitted_at"])
    return results


def _resend(
    engine: Engine,
    submitter: Submitter,
    old_job_id: str,
    request_id: str | None,
    traceparent: str | None,
) -> dict[str, Any] | None:
    """Claim, submit, and record the new job's id; None when another retry claimed it."""
    token = CLAIM_PREFIX + uuid.uuid4().hex
    claimed = dead_letters.claim(engine, old_job_id, token)
    if claimed is None:
        return None
    task = claimed["task"]
    origin = Origin(
        tenant=claimed["tenant"],
        request_id=request_id,
        traceparent=traceparent,
        retry_of=old_job_id,
    )
    try:
        job = submitter.submit(task, claimed["payload"], origin=origin)
    except (PayloadError, UnknownTaskError) as exc:
        dead_letters.release_claim(engine, old_job_id, token)
        return _line(old_job_id, task, None, "refused", error=str(exc))
    except BaseException:
        try:
            dead_letters.release_claim(engine, old_job_id, token)
        except Exception:  # the original error is the one to raise
            log.error(
                "dead letter %s left claimed (resubmitted_job_id %s) after a failed submit",
                old_job_id,
                token,
                exc_info=True,
            )
        raise
    try:
        dead_letters.settle_claim(engine, old_job_id, token, job.id)
    except Exception:
        log.error(
            "dead letter %s was resubmitted as job %s, but its row still says %s",
            old_job_id,
            job.id,
            token,
        )
        raise
    return _line(old_job_id, task, job.id, "resubmitted")


def _check(engine: Engine, submitter: Submitter, row: dict[str, Any]) -> dict[str, Any]:
    """A dry run's line: what the submitter would say of the payload, nothing sent."""
    if "payload" not in row:
        row = dead_letters.get_dead_letter(engine, row["job_id"], tenant=None) or row
    try:
        submitter.validate(row["task"], row.get("payload"))
    except (PayloadError, UnknownTaskError) as exc:
        return _line(row["job_id"], row["task"], None, "refused", error=str(exc))
    return _line(row["job_id"], row["task"], None, "would resubmit")


def _line(
    dead_letter: str, task: str, job_id: str | None, status: str, **extra: str
) -> dict[str, Any]:
    return {"dead_letter": dead_letter, "task": task, "job_id": job_id, "status": status, **extra}


__all__ = ["AlreadyResubmitted", "DeadLetterNotFound", "retry_dead_letters"]
