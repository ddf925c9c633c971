"""A drain: a queue pre-loaded with no-op jobs, emptied by freshly started workers.

The backlog of each system is sent once (``producer preload``), copied with ``DUMP`` (every
key of the database: queue lists, message hashes, Conveyor's job index), and put back with
``RESTORE`` on an emptied database before each round, so every round drains the same messages
and no round inherits another's delivery counters or results.

Timed from the first message taken (the queue's lists first hold fewer than the backlog) to
the last finished (nothing waiting and, where the system acknowledges after running, nothing
unacknowledged either), polled every ``POLL_S``. Over exactly that window: the CPU of the
worker process trees (``procs.cpu_s``: user + system, children included), of Valkey, and what
Redis did (``server.Accountant``: commands and round trips, the harness's polls removed).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench.compare_parts import procs
from bench.compare_parts.server import Accountant
from bench.compare_parts.systems import System

POLL_S = 0.005
#: Seconds a worker may take to take its first message.
START_TIMEOUT_S = 60.0


@dataclass
class Backlog:
    jobs: int
    dumps: dict[bytes, bytes]
    preload_s: float


def capture(acc: Accountant) -> dict[bytes, bytes]:
    """Every key of the (pre-loaded, otherwise empty) database, dumped."""
    client = acc.client
    keys = list(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.dump(key)
    return {k: v for k, v in zip(keys, pipe.execute(), strict=True) if v is not None}


def restore(acc: Accountant, backlog: Backlog) -> None:
    client = acc.client
    client.flushdb()
    pipe = client.pipeline(transaction=False)
    for n, (key, value) in enumerate(backlog.dumps.items(), start=1):
        pipe.restore(key, 0, value, replace=True)
        if n % 500 == 0:
            pipe.execute()
    pipe.execute()


@dataclass
class DrainResult:
    jobs: int
    seconds: float
    per_s: float
    cpu_ms_per_job: float
    valkey_cpu_ms_per_job: float
    redis: dict[str, Any]
    machine_busy_pct: float
    others_busy_pct: float
    startup_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


class Poller:
    def __init__(self, acc: Accountant, system: System):
        self.acc = acc
        self.ops = list(dict.fromkeys([*system.waiting, *system.outstanding]))
        self._w = [self.ops.index(op) for op in system.waiting]
        self._o = [self.ops.index(op) for op in system.outstanding]

    def read(self) -> tuple[int, int]:
        """(waiting, outstanding)."""
        counts = self.acc.pipeline_counts(self.ops)
        return sum(counts[i] for i in self._w), sum(counts[i] for i in self._o)


def drain(
    acc: Accountant,
    group: procs.Group,
    system: System,
    backlog: Backlog,
    env: dict[str, str],
    valkey_pid: int | None,
    keep_running: bool = False,
    timeout_s: float = 240.0,
) -> tuple[DrainResult, list[procs.Proc]]:
    """Drain ``backlog`` with ``system``'s workers; the figures, and the workers (stopped
    unless ``keep_running``)."""
    import os

    restore(acc, backlog)
    poller = Poller(acc, system)
    waiting, _ = poller.read()
    if waiting != backlog.jobs:
        raise RuntimeError(
            f"{system.key}: {waiting} jobs waiting after restore, not {backlog.jobs}"
        )
    started = time.perf_counter()
    workers = [group.start(name, argv, {**env, **extra}) for name, argv, extra in system.commands()]
    try:
        while True:  # until the first message is taken
            waiting, _ = poller.read()
            if waiting < backlog.jobs:
                break
            dead = [w for w in workers if not w.alive()]
            if dead:
                raise RuntimeError(f"{system.key}: {dead[0].name} exited:\n{dead[0].tail()}")
            if time.perf_counter() - started > START_TIMEOUT_S:
                raise RuntimeError(f"{system.key}: no message taken in {START_TIMEOUT_S:g} s")
            time.sleep(POLL_S)
        mark = acc.mark()
        before = acc.snapshot()
        t0 = time.perf_counter()
        pids = [w.pid for w in workers]
        cpu0, vk0, m0 = procs.cpu_s(pids), procs.own_cpu_s(valkey_pid), procs.machine_busy()
        me0 = procs.own_cpu_s(os.getpid())
        startup = t0 - started
        while True:
            _, outstanding = poller.read()
            if outstanding == 0:
                break
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"{system.key}: {outstanding} jobs left after {timeout_s:g} s")
            time.sleep(POLL_S)
        t1 = time.perf_counter()
        cpu1, vk1, m1 = procs.cpu_s(pids), procs.own_cpu_s(valkey_pid), procs.machine_busy()
        me1 = procs.own_cpu_s(os.getpid())
        after = acc.snapshot()
        extra = {"results": verify_results(acc, backlog.jobs)} if system.stores_results else {}
    except BaseException:
        group.stop(workers)
        raise
    if not keep_running:
        group.stop(workers)
    n, seconds = backlog.jobs, t1 - t0
    usage = acc.usage(before, after, mark)
    busy, avail = m1[0] - m0[0], m1[1] - m0[1]
    ours = (cpu1 - cpu0) + (vk1 - vk0) + (me1 - me0)
    result = DrainResult(
        jobs=n,
        seconds=round(seconds, 3),
        per_s=round(n / seconds, 1),
        cpu_ms_per_job=round((cpu1 - cpu0) * 1000 / n, 3),
        valkey_cpu_ms_per_job=round((vk1 - vk0) * 1000 / n, 3),
        redis=usage.per_job(n),
        machine_busy_pct=round(100 * busy / avail, 1) if avail else 0.0,
        others_busy_pct=round(100 * max(0.0, busy - ours) / avail, 1) if avail else 0.0,
        startup_s=round(startup, 2),
        extra=extra,
    )
    return result, workers


def verify_results(acc: Accountant, jobs: int) -> dict[str, int]:
    """Celery's stored results after a drain (after the measured window): how many there are,
    and how many say SUCCESS (for Conveyor: with a success envelope)."""
    client = acc.client
    keys = list(client.scan_iter(match="celery-task-meta-*", count=1000))
    ok = 0
    for i in range(0, len(keys), 1000):
        for raw in client.mget(keys[i : i + 1000]):
            meta = json.loads(raw) if raw else {}
            result = meta.get("result")
            if meta.get("status") == "SUCCESS" and (
                not isinstance(result, dict) or result.get("success", True) is True
            ):
                ok += 1
    if ok < jobs:
        raise RuntimeError(f"only {ok} of {jobs} jobs stored a successful result")
    return {"stored": len(keys), "successful": ok}
