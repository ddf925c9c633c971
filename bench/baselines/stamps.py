"""Where a baseline task records when it started: ``time.time()`` into one Redis hash.

The harness reads the hash after a latency phase; the key of each job is chosen by the
producer, so the same code serves Celery, Dramatiq and huey.
"""

from __future__ import annotations

import os
import threading
import time

import redis

#: The Redis every baseline app uses; set by the harness, never defaulted (no stray servers).
URL_ENV = "BENCH_REDIS_URL"
#: Hash of job key -> start time (epoch seconds, repr of a float).
STAMPS_KEY = "bench:stamps"

_lock = threading.Lock()
_client: redis.Redis | None = None
_pid = 0


def redis_url() -> str:
    url = os.environ.get(URL_ENV)
    if not url:
        raise RuntimeError(f"{URL_ENV} is not set: the baselines use only the harness's Redis")
    return url


def client() -> redis.Redis:
    """One client per process (a forked child makes its own)."""
    global _client, _pid
    with _lock:
        if _client is None or _pid != os.getpid():
            _client = redis.Redis.from_url(redis_url())
            _pid = os.getpid()
        return _client


def stamp(key: str) -> None:
    """Record that job ``key`` started now."""
    now = time.time()
    client().hset(STAMPS_KEY, key, repr(now))
