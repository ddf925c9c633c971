"""The worker's message consumer, changed in one way: a message it refuses is dead-lettered.

Celery acknowledges and drops a message it cannot decode (a pickled one: we accept JSON only),
one naming a task this worker does not know, and one that is malformed. Dropped would be lost;
instead each lands in ``dead_letters`` with why, ready to inspect. The body is kept as base64
text and never decoded.
"""

from __future__ import annotations

import base64
import logging
import uuid
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed

from conveyor.envelopes import FAMILIES
from workers.runtime import outcome

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
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
        )
    except Exception:  # the message is acknowledged either way; say loudly what was lost
        log.exception("could not dead-letter refused message %s: %s", job_id, error)


def _raw_body(message: Any) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()
