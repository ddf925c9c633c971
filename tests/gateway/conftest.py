"""A real ``conveyor gateway`` process (uvicorn, real sockets) for the gateway's tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from workers.dev.embedded import free_port

#: API keys of the keyed gateway, by tenant (their digests are its configuration).
KEYS = {
    "acme": "cvk_test_acme_0123456789abcdefghijklmnop",
    "globex": "cvk_test_globex_0123456789abcdefghijklmn",
    "burst": "cvk_test_burst_0123456789abcdefghijklmno",
    "ui": "cvk_test_ui_0123456789abcdefghijklmnopqrs",  # the page polls: its own budget
}
#: The keyed gateway's per-key limit: the tests of one key stay under it, but the burst test.
RATE_LIMIT = "40/minute"


class GatewayProcess:
    def __init__(self, log_path: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.headers: dict[str, str] = {}
        log_file = open(log_path, "wb")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "gateway", f"--port={self.port}"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
        log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited early:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"the gateway did not answer in {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)

    def for_tenant(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[tenant]}"}


def start_gateway(log_path: Path, env: dict[str, str]) -> GatewayProcess:
    gateway = GatewayProcess(log_path, env)
    try:
        gateway.wait_ready()
    except BaseException:
        gateway.stop()
        raise
    return gateway


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Dev mode with no keys: every request is the operator's (no tenant)."""
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    process = start_gateway(log_path, {"CONVEYOR_ENV": "dev", "CONVEYOR_GATEWAY_KEYS": ""})
    yield process
    process.stop()


@pytest.fixture(scope="session")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Production mode: API keys for tenants acme, globex and burst; a small rate limit."""
    from workers.gateway.auth import hash_key

    log_path = tmp_path_factory.mktemp("gateway") / "keyed-gateway.log"
    process = start_gateway(
        log_path,
        {
            "CONVEYOR_ENV": "prod",
            "CONVEYOR_GATEWAY_KEYS": ",".join(f"{t}:{hash_key(k)}" for t, k in KEYS.items()),
            "CONVEYOR_GATEWAY_SECRET": "test-secret-0123456789-0123456789-abcdef",
            "CONVEYOR_GATEWAY_RATE_LIMIT": RATE_LIMIT,
        },
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def ping_worker(tmp_path_factory: pytest.TempPathFactory):
    """A real maintenance worker for this module's jobs (stopped with the module, so no other
    module's jobs land on it)."""
    from tests.support.workers import WorkerFactory

    factory = WorkerFactory(tmp_path_factory.mktemp("workers"))
    worker = factory.start("maintenance")
    yield worker
    factory.stop_all()
