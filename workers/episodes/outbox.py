"""How AI and n8n jobs record their episode: an ``episodes.record`` message, like any other
service's, so the episodes pool alone writes ``episodic_logs`` (in batches) and a Postgres
outage delays the episode without failing the job that produced it.

The episode id is derived from the job id, so a job that runs twice (redelivered) sends the
same episode twice and the second is a no-op.

A busy ``ai`` worker finishes dozens of jobs a second, and one Celery message per episode cost
a seventh of such a job's CPU (serializing, a ``task-sent`` event, a round trip). So ``ai`` jobs
send theirs ``together``: through the process's ``EpisodeOutbox``, which puts every episode
that arrives within ``CONVEYOR_EPISODE_OUTBOX_MS`` into one packed message (the format
``Submitter.submit_many`` uses). A job waits until the message holding its episode is on the
broker, so it never finishes, and is acknowledged, with its episode only in memory.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from conveyor.jobindex import Origin
from conveyor.messages import message_for
from conveyor.schemas.episodes import EpisodePayload
from workers import settings
from workers.failures import Retryable
from workers.runtime import sending

#: Seconds a job waits at most for the message holding its episode to be sent (a send is
#: bounded by the broker's own timeouts; this is a safety net).
_SENT_WAIT_S = 120.0

#: (record id, payload) of one episode on its way.
Record = tuple[str, dict[str, Any]]


def episode_id_for(job_id: str) -> str:
    return f"job:{job_id}"


def log_episode(
    job_id: str, *, together: bool = False, tenant: str | None = None, **fields: Any
) -> str:
    """Validate and enqueue one episode for ``job_id``; returns the episode id.

    ``fields`` are ``EpisodePayload``'s (user_id, model_type, prompt, response, tokens, ...).
    ``together``: share a message with the episodes other threads of this process log within
    the outbox window (for pools of many threads; a lone thread would only wait). ``tenant``:
    whose job made it (its message header; one outbox per tenant, so a message is one
    tenant's).
    """
    episode_id = episode_id_for(job_id)
    payload = EpisodePayload.model_validate(
        {**fields, "episode_id": episode_id, "job_id": job_id}
    ).model_dump(mode="json", exclude_none=True)
    record = (f"episode-{job_id}", payload)
    if together:
        outbox(tenant).put(record)
    else:
        send_episodes([record], tenant=tenant)
    return episode_id


def send_episodes(records: list[Record], *, tenant: str | None = None) -> None:
    """One ``episodes.record`` message: a plain one for one record, else a pack."""
    message = message_for(records)
    if tenant is not None:
        message["headers"] = {**message.get("headers", {}), **Origin(tenant=tenant).headers()}
    sending.send("episodes.record", message)


class EpisodeNotSent(Retryable):
    """The message holding this episode could not be sent (the broker is away): the job runs
    again later, as it would had it sent its own message and failed."""


class _Pending:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.sent = threading.Event()
        self.error: str | None = None


class EpisodeOutbox:
    """Episodes of one process's threads, sent one message per window (group commit).

    The first thread to log an episode into an empty outbox leads: it waits ``window_s``,
    takes what the others logged meanwhile and sends it all in one message; the others wait
    for that send. Everyone returns once the message is on the broker, or raises
    ``EpisodeNotSent``.
    """

    def __init__(self, send: Callable[[list[Record]], None], window_s: float, max_records: int):
        self._send = send
        self._window_s = window_s
        self._max = max_records
        self._lock = threading.Lock()
        self._pending: _Pending | None = None

    def put(self, record: Record) -> None:
        with self._lock:
            pending = self._pending
            leader = pending is None
            if pending is None:
                pending = self._pending = _Pending()
            pending.records.append(record)
            if len(pending.records) >= self._max:
                self._pending = None  # full: the next episode starts a message of its own
        if not leader:
            if not pending.sent.wait(_SENT_WAIT_S):
                raise EpisodeNotSent("the message holding this episode was not sent in time")
            if pending.error is not None:
                raise EpisodeNotSent(pending.error)
            return
        try:
            time.sleep(self._window_s)
            with self._lock:
                if self._pending is pending:
                    self._pending = None
            self._send(pending.records)
        except BaseException as exc:  # even a thread stopped mid-way must not pass for sent
            with self._lock:
                if self._pending is pending:
                    self._pending = None
            pending.error = f"could not send {len(pending.records)} episode(s): {exc!r}"
            if not isinstance(exc, Exception):
                raise  # a stop (SystemExit, a pool's time limit) stays what it is
            raise EpisodeNotSent(pending.error) from exc
        finally:
            pending.sent.set()


@functools.cache
def outbox(tenant: str | None = None) -> EpisodeOutbox:
    """The process's outbox for one tenant's episodes."""
    ai = settings.ai()
    return EpisodeOutbox(
        functools.partial(send_episodes, tenant=tenant),
        window_s=ai.episode_outbox_ms / 1000,
        max_records=ai.episodes_pack,
    )
