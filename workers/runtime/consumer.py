"""The worker's message consumer, changed in one way: no message can stop it, and a message
it refuses is dead-lettered.

Celery acknowledges and drops a message it cannot decode (a pickled one: we accept JSON only),
one naming a task this worker does not know, one with no task header, and one that is
malformed in a way it checks. Dropped would be lost; instead each lands in ``dead_letters``
with why, ready to inspect, and its job gets a failed result. A message malformed in a way
Celery does not check (a body that is not ``[args, kwargs, embed]``, an ``embed`` that is not
an object, a body nested too deep to handle) makes Celery's handler raise inside the consumer,
which would stop the worker and leave the message to stop the next one: here it is refused
the same way. The body is kept as base64 text and never decoded.
"""

from __future__ import annotations

import base64
import logging
import uuid
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed

from conveyor.envelopes import FAMILIES
from conveyor.jobindex import Origin
from conveyor.messages import PACK_HEADER
from workers.runtime import outcome

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    connection_errors: tuple[type[BaseException], ...]
    channel_errors: tuple[type[BaseException], ...]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An ack of a message whose connection was lost (Redis restarted) runs on kombu's
        # collected channel and raises AttributeError, not a connection error: Celery's ack
        # path would let it stop the worker. Such a message cannot be acknowledged; it comes
        # back through the visibility timeout, as any message of a lost connection does.
        known: tuple[type[BaseException], ...] = tuple(self.connection_errors)
        self.connection_errors = (*known, AttributeError)
        #: What a message handler may raise that is the broker's trouble (or ours), not the
        #: message's: passed on to Celery, which reconnects. (AttributeError is not among
        #: them: a malformed header can raise it, and that message is refused.)
        self._not_the_message: tuple[type[BaseException], ...] = (
            *known,
            *tuple(self.channel_errors),
            MemoryError,
        )

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            try:
                problem = _shape_problem(message)
                if problem is not None:
                    _dead_letter(message, "poison", f"malformed task message: {problem}")
                    message.reject_log_error(log, self.connection_errors)
                    return None
                return handle(message)
            except self._not_the_message:
                raise
            except Exception as exc:  # a malformed message must never stop the worker
                self._refuse(message, exc)
                return None

        return on_task_received

    def _refuse(self, message: Any, exc: Exception) -> None:
        """Dead-letter a message Celery's handler choked on, then drop it from the queue."""
        if getattr(message, "acknowledged", False):  # it got as far as being settled
            log.warning("a settled message raised in the consumer: %r", exc)
            return
        described = f"{type(exc).__name__}: {exc}"[:500]
        _dead_letter(message, "poison", f"malformed task message: {described}")
        message.reject_log_error(log, self.connection_errors)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Celery collects the lost connection, then closes it; closing a Redis channel that
        still holds unacknowledged messages then asks the collected connection for its
        address and raises AttributeError, which Celery treats as unrecoverable: the worker
        exits on a Redis restart (bench/soak.py found it). The connection is already let go
        when that happens; its messages come back through the visibility timeout."""
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            log.warning("closing the lost broker connection failed (%r); reconnecting", error)
            self.connection = None

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _dead_letter(message, "poison", "malformed message: it names no task")
        super().on_unknown_message(body, message)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _dead_letter(message, "refused", f"message refused ({message.content_type}): {exc}")
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        task = (message.headers or {}).get("task", "?")
        _dead_letter(message, "unregistered", f"no worker on this queue runs task {task!r}")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        # Celery routes a serializer it does not accept (pickle) here too.
        if isinstance(exc, ContentDisallowed):
            _dead_letter(message, "refused", f"message refused ({message.content_type}): {exc}")
        else:
            _dead_letter(message, "poison", f"malformed task message: {exc}")
        super().on_invalid_task(body, message, exc)


def _shape_problem(message: Any) -> str | None:
    """What is wrong with a task message's body (protocol 2: ``[args, kwargs, embed]``), or
    None. Celery checks none of it before the pool, where a wrong shape fails outside the task
    (no dead letter) or raises in the consumer. Decoding it here costs nothing more: Celery
    decodes the body in the consumer too, and kombu keeps the result."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # protocol 1, or no task at all: Celery's own handling
    try:
        body = message.payload
    except Exception:
        return None  # undecodable: Celery's decode-error path refuses it
    if isinstance(body, dict):
        return None  # protocol 1 body
    if not isinstance(body, list | tuple) or len(body) != 3:
        return "the body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return f"args is a {type(args).__name__}, not a list"
    if not isinstance(kwargs, dict):
        return f"kwargs is a {type(kwargs).__name__}, not an object"
    if embed is not None and not isinstance(embed, dict):
        return f"embed is a {type(embed).__name__}, not an object"
    return None


def _dead_letter(message: Any, reason: str, error: str) -> None:
    """End the message's job through ``runtime.outcome.fail``: a dead letter holding the raw
    body, an error event on the job's stream and a failed result, so a caller waiting on the
    job learns at once (a message with no id gets one here, for its dead letter only)."""
    headers = message.headers or {}
    job_id = headers.get("id")
    queue = (message.delivery_info or {}).get("routing_key")
    payload = {
        "content_type": message.content_type,
        "body_base64": base64.b64encode(_raw_body(message)).decode(),
    }
    try:
        outcome.fail(
            str(job_id or uuid.uuid4()),
            str(headers.get("task") or "?"),
            payload,
            outcome.Ending(reason, error, 1),
            queue=queue,
            family=queue if queue in FAMILIES else None,
            store_result=bool(job_id),
            origin=Origin.from_headers(headers.get) if isinstance(headers, dict) else None,
        )
    except Exception:  # the message is acknowledged either way; say loudly what was lost
        log.exception("could not dead-letter refused message %s: %s", job_id, error)
    # A packed message's records have job ids of their own, which their callers wait on.
    packed = headers.get(PACK_HEADER) if isinstance(headers, dict) else None
    if isinstance(packed, list):
        records = [str(r) for r in packed if isinstance(r, str) and r][:10_000]
        outcome.fail_results(records, f"its message was refused ({reason}): {error}")


def _raw_body(message: Any) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()
