"""huey with its defaults on the harness's Redis (``RedisHuey``: blocking pop, results kept
only for tasks that return something, and these return nothing).

    huey_consumer bench.baselines.huey_app.huey --worker-type process --workers 2
"""

from __future__ import annotations

from huey import RedisHuey

from bench.baselines import stamps

NAME = "bench"

huey = RedisHuey(NAME, url=stamps.redis_url())
#: The list huey's Redis storage keeps its queue in.
QUEUE_KEY = huey.storage.queue_key


@huey.task()
def noop() -> None:
    return None


@huey.task()
def stamp(key: str) -> None:
    stamps.stamp(key)
