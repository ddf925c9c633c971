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
from conveyor.schemas.storable import (
    CHECKED,
    DEPTH,
    compact_size,
    format_path,
    json_problems,
)

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
    """The payload as its schema's model, or ``PayloadError`` naming every bad field.

    Besides the schema, every value must be JSON that workers and Postgres store as it is
    (``conveyor.schemas.storable``): no NaN or Infinity, no NUL or lone surrogate in a string
    or key, integers within 64 bits, at most ``MAX_DEPTH`` levels of nesting. Workers run this
    same function on receipt, so a raw message gets the verdict a submitted one would.
    """
    schema = schema_for(task_name)
    if not isinstance(payload, dict):
        raise PayloadError(
            task_name, [f"payload must be a JSON object, not {type(payload).__name__}"]
        )
    size, clean = compact_size(payload)  # C speed: most payloads need nothing more
    found = [] if clean else json_problems(payload)  # iterative: never a RecursionError
    problems = [str(problem) for problem in found]
    if any(problem.kind == DEPTH for problem in found):
        raise PayloadError(task_name, problems)  # nothing recursive may look at it
    if size is None:  # NaN, or a value json cannot write: measured as json would send it
        try:
            text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
            size = len(text.encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError, RecursionError) as exc:
            if found:  # the walk named what JSON cannot hold
                raise PayloadError(task_name, problems) from None
            raise PayloadError(task_name, [f"payload is not JSON-serializable: {exc}"]) from None
    if size > max_bytes:
        problems.append(f"payload is {size} bytes, over the limit of {max_bytes}")
        raise PayloadError(task_name, problems)
    try:
        model = schema.model_validate(payload, context=None if found else {CHECKED: True})
    except ValidationError as exc:
        errors = exc.errors()
        # A value the schema refused too (a NaN latency_ms, a NUL in prompt) is named once.
        refused = {tuple(err["loc"]) for err in errors}
        extra = [str(problem) for problem in found if problem.path not in refused]
        raise PayloadError(task_name, extra + [_describe(err) for err in errors]) from None
    if problems:
        raise PayloadError(task_name, problems)
    return model


def _describe(err: Any) -> str:
    return f"{format_path(tuple(err['loc']))}: {err['msg']}"


__all__ = ["SCHEMAS", "schema_for", "validate_payload"]
