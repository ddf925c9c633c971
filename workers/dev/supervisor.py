"""A small process supervisor for the dev stack: start children, restart the ones that die,
stop them all — and leave no stray process behind.

Each child runs in its own session (process group), so stopping it also stops whatever it
forked (a prefork pool's children).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Seconds before restarting a child that died: doubled on each quick death, capped.
_FIRST_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 30.0
#: A child that ran this long before dying is healthy again: its backoff starts over.
_HEALTHY_AFTER_S = 60.0
#: A child that exits with this code (EX_CONFIG, ``conveyor worker|beat|flower`` on a malformed
#: setting) is not restarted: it would fail the same way until its setting is fixed.
EXIT_CONFIG = 78


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = _FIRST_BACKOFF_S
    restart_at: float | None = None
    #: Where this run's lines start in its log (earlier runs' lines come before).
    log_offset: int = 0
    #: Why it cannot start, when it exited with ``EXIT_CONFIG``; it is not restarted.
    failed: str | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_text(self) -> str:
        """What this run wrote to its log so far."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)


class Supervisor:
    def __init__(self, report: Callable[[str], None]):
        self.children: list[Child] = []
        self._report = report

    def add(self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str]) -> Child:
        child = Child(name=name, argv=argv, log_path=log_path, env=env)
        self.children.append(child)
        child.start()
        return child

    def check(self) -> None:
        """Restart children that exited, with backoff; call this every fraction of a second."""
        now = time.monotonic()
        for child in self.children:
            if child.running() or child.failed is not None:
                continue
            if child.restart_at is None:
                code = child.process.returncode if child.process else None
                if code == EXIT_CONFIG:
                    lines = child.log_text().strip().splitlines()
                    child.failed = lines[-1] if lines else f"exited with code {code}"
                    self._report(
                        f"{child.name} cannot start: {child.failed} (not restarted: fix the "
                        f"setting and start again; log: {child.log_path})"
                    )
                    continue
                if now - child.started_at > _HEALTHY_AFTER_S:
                    child.backoff_s = _FIRST_BACKOFF_S
                child.signal_group(signal.SIGKILL)  # anything it left behind
                child.restart_at = now + child.backoff_s
                self._report(
                    f"{child.name} exited with code {code}; restarting in "
                    f"{child.backoff_s:.0f}s (log: {child.log_path})"
                )
                child.backoff_s = min(child.backoff_s * 2, _MAX_BACKOFF_S)
            elif now >= child.restart_at:
                child.restarts += 1
                child.start()
                self._report(f"{child.name} restarted (pid {child.pid})")

    def stop_all(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every child's main process (a worker's warm shutdown: running jobs finish;
        SIGTERM to its whole group would kill its pool's children mid-job), then SIGKILL
        every group, leaving nothing behind."""
        for child in self.children:
            if child.running() and child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            if child.process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.1, deadline - time.monotonic()))
        for child in self.children:
            if child.running():
                self._report(f"{child.name} did not stop in {timeout_s:.0f}s; killing it")
            child.signal_group(signal.SIGKILL)
            if child.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(5)
