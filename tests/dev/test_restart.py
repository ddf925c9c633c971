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


def test_a_second_stop_signal_cannot_cut_the_clean_up_short():
    """`make dev` under SIGTERM to its group: conveyor gets the signal, and make forwards its
    own a moment later, into the clean-up (a traceback and make's "Error 1" before)."""
    import signal

    import pytest

    from workers.dev import stack

    previous = {
        sig: signal.signal(sig, stack._raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with pytest.raises(stack._Stop):
            stack._raise_stop(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
