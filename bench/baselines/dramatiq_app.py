"""Dramatiq with its defaults on the harness's Redis.

    dramatiq bench.baselines.dramatiq_app --processes 2 --threads 8

Default middleware (retries, time limit, age limit, callbacks, pipelines), queue ``default``,
no result backend; messages are acknowledged after the actor ran.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.baselines import stamps

QUEUE = "default"
NAMESPACE = "dramatiq"

broker = RedisBroker(url=stamps.redis_url(), namespace=NAMESPACE)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE)
def noop() -> None:
    return None


@dramatiq.actor(queue_name=QUEUE)
def stamp(key: str) -> None:
    stamps.stamp(key)
