"""Processes the harness starts (each in a process group of its own, stopped by its id) and
the CPU time of a process tree.

CPU of a tree is user + system time of every live process in it plus what its processes'
reaped children used (``children_user``/``children_system``): a prefork child recycled during
a drain still counts. A drain's figure is the difference between two readings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Group:
    """Every process one harness run started; ``stop_all`` ends them (and only them)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._n = 0

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        self._n += 1
        log = self.log_dir / f"{self._n:02d}-{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: pgid == its pid
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[Proc], timeout_s: float = 15.0) -> None:
        """SIGTERM each group (warm shutdown), then SIGKILL what is left of it."""
        for p in procs:
            if p.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout_s)
            # Children left behind in the group (a prefork child orphaned by a kill).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(5)
        for p in procs:
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self) -> None:
        self.stop(list(self.procs))


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_pids(pids: list[int]) -> list[int]:
    return [p.pid for pid in pids for p in tree(pid)]


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes, their live descendants, and the
    descendants they reaped."""
    total = 0.0
    for pid in pids:
        for proc in tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def own_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of one process alone (the Valkey server)."""
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall-clock CPU seconds available) so far."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
    total = busy + t.idle + getattr(t, "iowait", 0) + getattr(t, "steal", 0)
    return busy, total
