"""One schema per public task, shared by the submitter (reject before enqueue) and the task
(reject on receipt)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from conveyor.errors import PayloadError, UnknownTaskError
from conveyor.names import TASK_QUEUES
from conveyor.schemas.ai import AnalyzePayload, ChatPayload, CodePayload, GeneratePayload
from conveyor.schemas.common import Payload
from conveyor.schemas.episodes import EpisodePayload, EpisodeRetentionPayload
from conveyor.schemas.maintenance import NoPayload, PingPayload
from conveyor.schemas.n8n import N8nExecutePayload

SCHEMAS: dict[str, type[Payload]] = {
    "ai.generate": GeneratePayload,
    "ai.chat": ChatPayload,
    "ai.code": CodePayload,
    "ai.analyze": AnalyzePayload,
    "episodes.record": EpisodePayload,
    "n8n.execute": N8nExecutePayload,
    "maintenance.ping": PingPayload,
    "maintenance.queue_metrics": NoPayload,
    "maintenance.flush_dead_letters": NoPayload,
    "maintenance.reconcile_workflows": NoPayload,
    "maintenance.episode_retention": EpisodeRetentionPayload,
}

assert SCHEMAS.keys() == TASK_QUEUES.keys(), "every public task needs exactly one schema"


def schema_for(task_name: str) -> type[Payload]:
    try:
        return SCHEMAS[task_name]
    except KeyError:
        known = ", ".join(sorted(SCHEMAS))
        raise UnknownTaskError(f"unknown task {task_name!r}; known tasks: {known}") from None


def validate_payload(task_name: str, payload: Any, *, max_bytes: int) -> Payload:
    """The payload as its schema's model, or ``PayloadError`` naming every bad field."""
    schema = schema_for(task_name)
    if not isinstance(payload, dict):
        raise PayloadError(
            task_name, [f"payload must be a JSON object, not {type(payload).__name__}"]
        )
    try:
        size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError) as exc:
        raise PayloadError(task_name, [f"payload is not JSON-serializable: {exc}"]) from None
    if size > max_bytes:
        raise PayloadError(task_name, [f"payload is {size} bytes, over the limit of {max_bytes}"])
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise PayloadError(task_name, [_describe(err) for err in exc.errors()]) from None


def _describe(err: Any) -> str:
    where = ".".join(str(part) for part in err["loc"]) or "payload"
    return f"{where}: {err['msg']}"


__all__ = ["SCHEMAS", "schema_for", "validate_payload"]
