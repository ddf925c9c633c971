"""How AI and n8n jobs record their episode: an ``episodes.record`` message, like any other
service's, so the episodes pool alone writes ``episodic_logs`` (in batches) and a Postgres
outage delays the episode without failing the job that produced it.

The episode id is derived from the job id, so a job that runs twice (redelivered) sends the
same episode twice and the second is a no-op.
"""

from __future__ import annotations

from typing import Any

from conveyor.names import queue_for
from conveyor.schemas.episodes import EpisodePayload
from workers.app import app


def episode_id_for(job_id: str) -> str:
    return f"job:{job_id}"


def log_episode(job_id: str, **fields: Any) -> str:
    """Validate and enqueue one episode for ``job_id``; returns the episode id.

    ``fields`` are ``EpisodePayload``'s (user_id, model_type, prompt, response, tokens, ...).
    """
    episode_id = episode_id_for(job_id)
    payload = EpisodePayload.model_validate(
        {**fields, "episode_id": episode_id, "job_id": job_id}
    ).model_dump(mode="json", exclude_none=True)
    queue = queue_for("episodes.record")
    app.send_task(
        "episodes.record",
        args=(payload,),
        task_id=f"episode-{job_id}",
        queue=queue,
        routing_key=queue,
    )
    return episode_id
