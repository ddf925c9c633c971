"""Real ``conveyor worker`` processes for tests: started, waited for, killed, always reaped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

#: Worker settings under which a killed worker's job comes back within seconds, not 30 min.
FAST_REDELIVERY = {
    "CONVEYOR_VISIBILITY_TIMEOUT": "7",
    "CONVEYOR_RETRY_CAP": "1",
    "CONVEYOR_AI_TIME_LIMIT": "5",
    "CONVEYOR_N8N_TIME_LIMIT": "5",
    "CONVEYOR_EPISODES_TIME_LIMIT": "5",
    "CONVEYOR_MAINTENANCE_TIME_LIMIT": "5",
}


class WorkerProcess:
    def __init__(self, pool: str, process: subprocess.Popen, log_path: Path, hostname: str):
        self.pool = pool
        self.process = process
        self.log_path = log_path
        self.hostname = hostname

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.hostname} exited early:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.hostname} not ready in {timeout}s:\n{self.log()[-3000:]}")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in log of {self.hostname}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group: the worker and any pool children it forked."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.kill(signal.SIGKILL)  # leave no pool child behind, whatever happened
        self.process.wait(5)


class WorkerFactory:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(
        self,
        pool: str,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        wait: bool = True,
    ) -> WorkerProcess:
        hostname = f"{pool}-{uuid.uuid4().hex[:6]}@test"
        log_path = self.log_dir / f"{hostname}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed on exit
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "worker",
                pool,
                "--loglevel=INFO",
                f"--hostname={hostname}",
                *args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        log_file.close()
        worker = WorkerProcess(pool, process, log_path, hostname)
        self.started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()
