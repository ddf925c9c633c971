"""Process-wide clients for Redis and Postgres, created on first use.

Created lazily so a prefork parent never opens a socket its children would inherit;
``reset()`` runs in every fresh child (see ``workers.app``).
"""

from __future__ import annotations

import functools

import redis
from sqlalchemy import Engine, create_engine

from workers import settings
from workers.store.db import sqlalchemy_url


def database_url(url: str | None = None) -> str:
    """The configured database (or ``url``) as a SQLAlchemy URL for psycopg2."""
    return sqlalchemy_url(url or settings.core().database_url)


@functools.cache
def redis_client() -> redis.Redis:
    # Every thread of a threads pool may hold a connection at once (events, breakers, cancel
    # keys): the pool must be larger than the biggest pool's concurrency, and a thread that
    # still finds it empty waits for one instead of failing ("Too many connections").
    own = settings.current_pool()
    slots = own.concurrency if own else max(p.concurrency for p in settings.pools().values())
    pool = redis.BlockingConnectionPool.from_url(
        settings.core().redis_url,
        max_connections=slots + 32,
        timeout=20,
        # Timeouts so a vanished Redis fails a call (and the job retries) instead of hanging it.
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=25,
    )
    return redis.Redis(connection_pool=pool)


@functools.cache
def engine() -> Engine:
    return create_engine(
        database_url(),
        pool_pre_ping=True,  # a connection broken by a Postgres restart is replaced, not used
        pool_size=settings.core().db_pool_size,
        max_overflow=settings.core().db_max_overflow,
        connect_args={"connect_timeout": 5, "application_name": "conveyor"},
    )


def reset() -> None:
    if engine.cache_info().currsize:
        engine().dispose(close=False)
    engine.cache_clear()
    redis_client.cache_clear()
