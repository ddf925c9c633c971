"""The wire format both sides share: a plain Celery message, or a pack of many jobs.

A plain message is exactly what anyone would send with Celery's ``send_task`` (args: the
payload; task id: the job id). A packed message carries many jobs of one task: its args are
their payloads, in order; its header ``PACK_HEADER`` lists their job ids, aligned with the
args; the message has an id of its own. Only batched tasks, whose worker expands a pack, are
sent packed (``episodes.record``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

#: Header of a packed message: the job id of each record, aligned with the args.
PACK_HEADER = "conveyor_pack"

#: Characters of a payload shown in Flower and worker logs (``argsrepr``): prompts can be long.
ARGSREPR_CHARS = 200


def message_for(records: list[tuple[str, Any]]) -> dict[str, Any]:
    """``send_task``'s ``args``, ``task_id``, ``headers`` and ``argsrepr`` for (job id, payload)
    records of one task: for one record, exactly the message anyone would send with Celery;
    for more, a pack (``PACK_HEADER``)."""
    if len(records) == 1:
        [(job_id, payload)] = records
        return {"args": (payload,), "task_id": job_id, "argsrepr": short_repr(payload)}
    return {
        "args": tuple(payload for _, payload in records),
        "task_id": str(uuid.uuid4()),
        "headers": {PACK_HEADER: [job_id for job_id, _ in records]},
        "argsrepr": f"{len(records)} records, the first: {short_repr(records[0][1])}",
    }


def short_repr(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, default=str)
    return text if len(text) <= ARGSREPR_CHARS else text[:ARGSREPR_CHARS] + "…"
