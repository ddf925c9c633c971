"""The public task names and the queue each one runs on: the one source for both.

Other services rely on these names (see DESIGN.md). ``celeryconfig`` builds its routes from
this table and the submitter refuses any name not in it, so a rename here is a conscious act
that ``tests/client/test_contract.py`` makes visible.
"""

from __future__ import annotations

AI = "ai"
N8N = "n8n"
EPISODES = "episodes"
MAINTENANCE = "maintenance"

#: Every queue Conveyor consumes, in the order pools are listed.
QUEUES: tuple[str, ...] = (AI, N8N, EPISODES, MAINTENANCE)

#: Public task name -> queue. ``maintenance.*`` jobs are beat's and operators'.
TASK_QUEUES: dict[str, str] = {
    "ai.generate": AI,
    "ai.chat": AI,
    "ai.code": AI,
    "ai.analyze": AI,
    "episodes.record": EPISODES,
    "n8n.execute": N8N,
    "maintenance.ping": MAINTENANCE,
    "maintenance.queue_metrics": MAINTENANCE,
    "maintenance.flush_dead_letters": MAINTENANCE,
    "maintenance.reconcile_workflows": MAINTENANCE,
    "maintenance.episode_retention": MAINTENANCE,
}


def queue_for(task_name: str) -> str:
    """The queue of a public task; ``KeyError`` for a name that is not public."""
    return TASK_QUEUES[task_name]
