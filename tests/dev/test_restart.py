"""A restarted `conveyor dev` keeps its Valkey's port and judges readiness by this run's log."""

from __future__ import annotations

import socket
import sys

from workers.dev.embedded import free_port
from workers.dev.supervisor import Child


def test_a_port_whose_connections_linger_in_time_wait_is_still_free():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end lingers in TIME_WAIT
    server.close()
    client.close()
    assert free_port(port) == port


def test_readiness_is_read_from_this_runs_log_lines_only(tmp_path):
    log = tmp_path / "worker-ai.log"
    log.write_text("[earlier run] ai@host ready.\n")
    child = Child(
        name="worker-ai",
        argv=[sys.executable, "-c", "print('starting', flush=True)"],
        log_path=log,
        env={},
    )
    child.start()
    assert child.process is not None
    child.process.wait(10)
    assert "starting" in child.log_text()
    assert " ready." not in child.log_text()  # the earlier run's line does not count
