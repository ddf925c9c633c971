"""Queue lengths as Redis holds them, for operators, autoscalers and dashboards."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis

#: kombu's hash of delivered-but-unacknowledged messages (the Redis transport's default name).
UNACKED_HASH = "unacked"


def queue_keys(queue: str, priority_steps: Sequence[int], sep: str) -> list[str]:
    """The Redis lists kombu keeps for one queue: one per priority step, step 0 unsuffixed."""
    return [queue if step == 0 else f"{queue}{sep}{step}" for step in priority_steps]


def queue_lengths(
    client: redis.Redis, queues: Iterable[str], *, priority_steps: Sequence[int], sep: str
) -> dict[str, int]:
    """Waiting messages per queue (all priorities), plus ``unacked``: delivered, not yet done."""
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in queue_keys(queue, priority_steps, sep):
            pipe.llen(key)
    pipe.hlen(UNACKED_HASH)
    counts = pipe.execute()
    per_queue = len(priority_steps)
    lengths = {q: sum(counts[i * per_queue : (i + 1) * per_queue]) for i, q in enumerate(queues)}
    lengths["unacked"] = counts[-1]
    return lengths
