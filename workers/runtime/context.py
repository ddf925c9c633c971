"""What plain job code may know and do besides its payload: ``JobContext``. No Celery here.

A job function ``fn(ctx, payload) -> dict`` reports through its context (events under its
family's names) and reaches the process's clients through ``connections``; it never sees
Celery's task or request, so it can be called and tested as a plain function.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from conveyor.envelopes import EventSuffix, EventType, component_of, event_name
from conveyor.jobindex import Origin
from workers import settings
from workers.runtime import connections
from workers.runtime.events import EventPublisher

log = logging.getLogger(__name__)

#: A job no request made (beat's, a test's): no tenant, no correlation ids.
NO_ORIGIN = Origin()


@functools.cache
def publisher() -> EventPublisher:
    """The process's one event publisher."""
    core = settings.core()
    return EventPublisher(
        connections.redis_client(),
        stream_maxlen=core.event_stream_maxlen,
        ttl_s=core.event_ttl_s,
    )


@dataclass(frozen=True)
class JobContext:
    """What a job function may know and do besides its payload."""

    job_id: str
    task_name: str
    #: 0 on the first attempt, n on the n-th retry.
    attempt: int
    #: Its family (``conveyor.envelopes.FAMILIES``): the component and names of its events.
    family: str
    #: The Celery worker's node name, e.g. ``ai@host``.
    hostname: str = ""
    #: Whose job and which request made it: carried into its events, logs and dead letter.
    origin: Origin = NO_ORIGIN

    def emit(
        self, suffix: EventSuffix, data: dict[str, Any], *, type: EventType = "update"
    ) -> None:
        """Publish ``<prefix>_<suffix>`` (e.g. ``ai_generation_progress``) for this job."""
        publisher().publish(
            self.job_id,
            type=type,
            component=component_of(self.family),
            event=event_name(self.family, suffix),
            data=data,
            request_id=self.origin.request_id,
        )

    def emit_soon(self, suffix: EventSuffix, data: dict[str, Any]) -> None:
        """Like ``emit``, in the process's next event batch (``EventPublisher.publish_soon``):
        no round trip of its own, and still before any later event of this job. Best effort:
        a batch Redis refuses is logged, not raised (the job's own Redis calls fail anyway)."""
        publisher().publish_soon(
            self.job_id,
            type="update",
            component=component_of(self.family),
            event=event_name(self.family, suffix),
            data=data,
            request_id=self.origin.request_id,
        )

    def progress(self, **data: Any) -> None:
        self.emit("progress", data)

    def emit_quietly(
        self, suffix: EventSuffix, data: dict[str, Any], *, type: EventType = "update"
    ) -> None:
        """Publish, logging instead of raising: for events about a failure (Redis may be its
        cause) and for progress inside a stream (a Redis hiccup must not fail a generation)."""
        try:
            self.emit(suffix, data, type=type)
        except Exception:
            log.exception(
                "could not publish %s for job %s", event_name(self.family, suffix), self.job_id
            )


# --- Batched tasks (``runtime.batching``) ---------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One record of a batch (a message, or one record of a packed message), as the batch
    function sees it."""

    job_id: str
    #: As received: not validated yet.
    payload: Any
    queue: str | None = None
    #: Handed out before (restored from a dead worker, or given back).
    redelivered: bool = False
    #: Whose record and which request sent it (the message's headers).
    origin: Origin = NO_ORIGIN


@dataclass(frozen=True)
class Verdict:
    """A batch function's answer: every item is settled (written, already there, or failed for
    good through ``ctx.fail``) except those at the indices in ``retry``, which wait and go
    again; ``reason`` says why, for the log."""

    retry: tuple[int, ...] = ()
    reason: str = ""


class BatchContext:
    """What a batch function may do besides reading its items."""

    def __init__(self, task_name: str, family: str):
        self.task_name = task_name
        self.family = family

    def fail(self, item: Item, reason: str, error: str, *, attempts: int = 1) -> None:
        """Settle ``item`` as failed for good (``runtime.outcome.fail``): its dead letter, its
        ``*_error`` event and a failed result for a caller waiting on it. Raises only when
        neither Postgres nor Redis took the dead letter."""
        from workers.runtime import outcome  # the end-of-job path builds on this module

        outcome.fail(
            item.job_id,
            self.task_name,
            item.payload,
            outcome.Ending(reason, error, attempts),
            queue=item.queue,
            family=self.family,
            store_result=True,
            origin=item.origin,
        )
