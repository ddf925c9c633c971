"""``episodes.record``: one episodic log, written in batches (``workers.episodes.writer``).

A batched task (``workers.runtime.batching``): the episodes pool writes records in batches of
``CONVEYOR_EPISODES_BATCH_SIZE`` (or whatever arrived within ``CONVEYOR_EPISODES_FLUSH_MS``),
one round trip each, and acknowledges a message (one record, or a pack) only after every record
in it is settled. A record that fails for good gets its ``episode_error`` event, a failed
result and a row in ``dead_letters``.
"""

from __future__ import annotations

from workers.episodes.writer import write_batch
from workers.runtime.batching import BatchContext, Item, Verdict, batch_job


@batch_job("episodes.record", family="episodes")
def record(ctx: BatchContext, items: list[Item]) -> Verdict:
    """Write a batch of episodes: exactly one row per episode id."""
    return write_batch(ctx, items)
