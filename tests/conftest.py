"""Real servers for the whole test session, before any test module reads its settings.

``TEST_REDIS_URL`` (a Redis database the tests may flush) and ``TEST_DATABASE_URL`` (a Postgres
server where the tests may create and drop a database) point the suite at servers of your own;
without them it starts embedded Valkey and PostgreSQL on free ports in a temporary folder.
Either way the session's URLs are exported as ``REDIS_URL`` / ``DATABASE_URL``, so every
worker process a test starts inherits them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.fakes.llm_server import llm_server  # noqa: F401 - a fixture, for every test module
from tests.fakes.n8n_server import n8n_server  # noqa: F401 - a fixture, for every test module
from tests.support.servers import TestServers, start_test_servers
from tests.support.workers import WorkerFactory

_servers: TestServers | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _servers
    if hasattr(config, "workerinput"):  # pragma: no cover - xdist workers reuse the parent's
        return
    home = Path(tempfile.mkdtemp(prefix="conveyor-tests-"))
    _servers = start_test_servers(home)
    os.environ.update(
        REDIS_URL=_servers.redis_url,
        CELERY_BROKER_URL=_servers.redis_url,
        CELERY_RESULT_BACKEND=_servers.redis_url,
        DATABASE_URL=_servers.database_url,
        CONVEYOR_ENV="dev",
        CONVEYOR_HOME=str(home / "conveyor-home"),
    )
    from workers.store.migrate import upgrade

    upgrade(_servers.database_url)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault tests' counts: submitted, completed, lost, duplicated, dead-lettered."""
    from tests.support import faults

    if faults.RESULTS:
        terminalreporter.section("fault suite: what each fault did to the jobs")
        for line in faults.table():
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _servers is not None:
        _servers.stop()
        shutil.rmtree(_servers.home, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> str:
    assert _servers is not None
    return _servers.redis_url


@pytest.fixture(scope="session")
def database_url() -> str:
    assert _servers is not None
    return _servers.database_url


@pytest.fixture(scope="session")
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def engine(database_url: str):
    from sqlalchemy import create_engine

    from workers.store.db import sqlalchemy_url

    eng = create_engine(sqlalchemy_url(database_url))
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def submitter():
    from conveyor import Submitter

    sub = Submitter()
    yield sub
    sub.close()


@pytest.fixture
def workers(tmp_path: Path):
    """Starts real ``conveyor worker`` processes; every one is stopped after the test."""
    factory = WorkerFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def unique() -> str:
    """A fresh suffix for names a test creates, so tests never share state by accident."""
    return uuid.uuid4().hex[:12]
