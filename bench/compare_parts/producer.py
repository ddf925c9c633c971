"""Jobs sent from one process: ``python -m bench.compare_parts.producer ADAPTER MODE ...``.

Run by the harness as a subprocess per measurement, so each system sends from a fresh
process of its own with only its own library imported. Modes:

- ``enqueue``: after a short untimed warm-up, send no-op jobs as fast as one thread can,
  ``--jobs`` of them or for ``--seconds``, whichever ends first; jobs/s, the process's CPU per
  job (``time.process_time``: user + system of this process), and what Redis did per job
  (``INFO``: commands, including those run by scripts, and round trips = read events);
- ``preload``: send ``--jobs`` no-op jobs (a drain's backlog), untimed;
- ``rate``: an open-loop schedule of latency jobs at ``--rate`` a second for ``--seconds``
  (after ``--warmup`` seconds of the same, not counted): job ``i`` is sent at
  ``t0 + i / rate`` whether or not earlier ones started (a producer that falls behind sends
  at once, and stops at the schedule's end); the time of each send (``time.time()`` just
  before the call) is written out with the job's key.

Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

#: Jobs a ``submit_many`` call carries (as ``bench.episodes`` pre-loads).
MANY_CHUNK = 500
WARMUP_JOBS = 50


class Adapter:
    """One system's way of sending: ``send(n)`` sends n no-op jobs (one call each, unless the
    adapter packs), ``stamped(key)`` sends one latency job and returns the key to look for."""

    #: Jobs one ``send`` call handles at most (1: one API call a job).
    chunk = 1

    def send(self, n: int) -> None:
        raise NotImplementedError

    def stamped(self, key: str) -> str:
        raise NotImplementedError


class ConveyorSubmit(Adapter):
    """``Submitter.submit("maintenance.ping", {})``: validated, one job a call."""

    task = "maintenance.ping"

    def __init__(self) -> None:
        from conveyor import Submitter

        self.submitter = Submitter()

    def payloads(self, n: int) -> list[dict[str, Any]]:
        return [{} for _ in range(n)]

    def send(self, n: int) -> None:
        for payload in self.payloads(n):
            self.submitter.submit(self.task, payload)

    def stamped(self, key: str) -> str:
        return self.submitter.submit(self.task, {}).id


class ConveyorManyPing(ConveyorSubmit):
    """``Submitter.submit_many("maintenance.ping", ...)``, 500 a call: validated, one message
    a job (only ``episodes.record`` is packed)."""

    chunk = MANY_CHUNK

    def send(self, n: int) -> None:
        self.submitter.submit_many(self.task, self.payloads(n))


class ConveyorManyEpisodes(ConveyorManyPing):
    """``Submitter.submit_many("episodes.record", ...)``, 500 a call, packed
    (``CONVEYOR_EPISODES_PACK`` records a message): the packed path."""

    task = "episodes.record"

    def __init__(self) -> None:
        super().__init__()
        from bench.episodes import make_records

        self._records = make_records(MANY_CHUNK, "bench-compare")

    def payloads(self, n: int) -> list[dict[str, Any]]:
        return self._records[:n]


class Bare(Adapter):
    """``apply_async()`` of the bare task on Conveyor's Celery settings."""

    def __init__(self) -> None:
        from bench.baselines import conveyor_bare

        self.module = conveyor_bare

    def send(self, n: int) -> None:
        for _ in range(n):
            self.module.noop.apply_async()

    def stamped(self, key: str) -> str:
        self.module.stamp.apply_async((key,))
        return key


class CeleryDefaults(Adapter):
    """``apply_async()`` (what ``delay`` does) with Celery's defaults."""

    def __init__(self) -> None:
        from bench.baselines import celery_defaults

        self.module = celery_defaults

    def send(self, n: int) -> None:
        for _ in range(n):
            self.module.noop.apply_async()

    def stamped(self, key: str) -> str:
        self.module.stamp.apply_async((key,))
        return key


class CeleryTuned(Adapter):
    """``send_task`` on one producer held for the whole run (no per-call acquire)."""

    def __init__(self) -> None:
        from bench.baselines import celery_tuned

        self.app = celery_tuned.app
        self._producer_cm = self.app.producer_or_acquire()
        self.producer = self._producer_cm.__enter__()

    def send(self, n: int) -> None:
        for _ in range(n):
            self.app.send_task("bench.noop", producer=self.producer)

    def stamped(self, key: str) -> str:
        self.app.send_task("bench.stamp", args=(key,), producer=self.producer)
        return key


class Dramatiq(Adapter):
    """``actor.send()``."""

    def __init__(self) -> None:
        from bench.baselines import dramatiq_app

        self.module = dramatiq_app

    def send(self, n: int) -> None:
        for _ in range(n):
            self.module.noop.send()

    def stamped(self, key: str) -> str:
        self.module.stamp.send(key)
        return key


class Huey(Adapter):
    """Calling the task (huey enqueues it)."""

    def __init__(self) -> None:
        from bench.baselines import huey_app

        self.module = huey_app

    def send(self, n: int) -> None:
        for _ in range(n):
            self.module.noop()

    def stamped(self, key: str) -> str:
        self.module.stamp(key)
        return key


ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "conveyor": ConveyorSubmit,
    "conveyor_many_ping": ConveyorManyPing,
    "conveyor_many_episodes": ConveyorManyEpisodes,
    "bare": Bare,
    "celery_defaults": CeleryDefaults,
    "celery_tuned": CeleryTuned,
    "dramatiq": Dramatiq,
    "huey": Huey,
}


def _redis_counters(client: redis.Redis) -> tuple[int, int]:
    info = client.info("stats")
    return int(info["total_commands_processed"]), int(info["total_reads_processed"])


def enqueue(adapter: Adapter, jobs: int, seconds: float, redis_url: str) -> dict[str, Any]:
    adapter.send(min(WARMUP_JOBS, adapter.chunk) if adapter.chunk > 1 else WARMUP_JOBS)
    counters = redis.Redis.from_url(redis_url)
    c0, r0 = _redis_counters(counters)
    sent = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while sent < jobs and time.perf_counter() < deadline:
        n = min(adapter.chunk, jobs - sent)
        adapter.send(n)
        sent += n
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    c1, r1 = _redis_counters(counters)
    # Less the INFO that opened the window (counted in the second reading).
    return {
        "jobs": sent,
        "seconds": round(elapsed, 3),
        "per_s": round(sent / elapsed, 1),
        "cpu_us_per_job": round(cpu * 1e6 / sent, 1),
        "redis_commands_per_job": round((c1 - c0 - 1) / sent, 2),
        "redis_round_trips_per_job": round((r1 - r0 - 1) / sent, 2),
        "chunk": adapter.chunk,
    }


def preload(adapter: Adapter, jobs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    sent = 0
    chunk = max(adapter.chunk, 1)
    while sent < jobs:
        n = min(chunk, jobs - sent)
        adapter.send(n)
        sent += n
    return {"jobs": sent, "seconds": round(time.perf_counter() - t0, 3)}


def rate(adapter: Adapter, per_s: float, seconds: float, warmup_s: float) -> dict[str, Any]:
    n_warm = int(per_s * warmup_s)
    n = n_warm + int(per_s * seconds)
    sends: list[tuple[str, float, bool]] = []
    interval = 1.0 / per_s
    t0 = time.perf_counter()
    # A producer that cannot keep to the schedule stops at its end all the same: the phase
    # lasts as long for every system, and the rate it did offer is reported.
    stop_at = t0 + (warmup_s + seconds) * 1.05 + 0.1
    late_max = 0.0
    for i in range(n):
        due = t0 + i * interval
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        else:
            late_max = max(late_max, now - due)
            if now > stop_at:
                break
        warm = i < n_warm
        key = f"{'w' if warm else 'm'}-{i}"
        at = time.time()
        sends.append((adapter.stamped(key), at, warm))
    measured = [at for _, at, warm in sends if not warm]
    span = measured[-1] - measured[0] if len(measured) > 1 else 0.0
    return {
        "sends": sends,
        "offered_per_s": round((len(measured) - 1) / span, 1) if span else None,
        "scheduled_per_s": per_s,
        "late_max_ms": round(late_max * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_parts.producer")
    p.add_argument("adapter", choices=sorted(ADAPTERS))
    p.add_argument("mode", choices=("enqueue", "preload", "rate"))
    p.add_argument("--redis-url", required=True)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    adapter = ADAPTERS[args.adapter]()
    if args.mode == "enqueue":
        result = enqueue(adapter, args.jobs, args.seconds, args.redis_url)
    elif args.mode == "preload":
        result = preload(adapter, args.jobs)
    else:
        result = rate(adapter, args.rate, args.seconds, args.warmup)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
