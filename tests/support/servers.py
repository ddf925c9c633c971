"""The Redis and Postgres a test session talks to: given by URL, or embedded and started here."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import redis
from psycopg2 import sql
from sqlalchemy.engine import make_url

from workers.dev.embedded import EmbeddedPostgres, EmbeddedRedis


@dataclass
class TestServers:
    home: Path
    redis_url: str
    database_url: str
    _stops: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for stop in reversed(self._stops):
            stop()


def start_test_servers(home: Path) -> TestServers:
    stops: list[Any] = []
    redis_url = os.environ.get("TEST_REDIS_URL")
    if redis_url:
        redis.Redis.from_url(redis_url).flushdb()
    else:
        embedded_redis = EmbeddedRedis(home / "valkey", persist=False)
        redis_url = embedded_redis.start()
        stops.append(embedded_redis.stop)

    name = f"conveyor_test_{uuid.uuid4().hex[:8]}"
    admin_url = os.environ.get("TEST_DATABASE_URL")
    if admin_url:
        database_url = _create_database(admin_url, name)
        stops.append(lambda: _drop_database(admin_url, name))
    else:
        embedded_pg = EmbeddedPostgres(home / "postgres")
        embedded_pg.start()
        database_url = embedded_pg.create_database(name)
        stops.append(embedded_pg.stop)
    return TestServers(home=home, redis_url=redis_url, database_url=database_url, _stops=stops)


def _admin(url: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def _create_database(admin_url: str, name: str) -> str:
    conn = _admin(admin_url)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(admin_url: str, name: str) -> None:
    conn = _admin(admin_url)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()
