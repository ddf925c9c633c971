"""Submit -> start at a fixed offered rate, on workers already running (warm, queue empty).

A producer process (``producer rate``) sends latency jobs on an open-loop schedule and notes
``time.time()`` just before each send call. The start of a job is

- for the baselines and the bare task: ``time.time()`` the task itself wrote into
  ``bench:stamps`` as its first statement (float seconds);
- for Conveyor's ``maintenance.ping``: the ``timestamp`` of the job's ``maintenance_start``
  event (the first entry of its event stream), taken by the job wrapper when it begins, before
  the payload's function runs. It has millisecond resolution and is truncated, so this figure
  can read up to 1 ms low.

Latency = start - send, per job; percentiles by nearest rank over the measured jobs (the
warm-up's excluded). Jobs that never started within the wait are counted, not hidden.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.compare_parts import procs
from bench.compare_parts.drain import Poller
from bench.compare_parts.server import Accountant
from bench.compare_parts.systems import System

STAMPS_KEY = "bench:stamps"
WARMUP_S = 0.5


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _event_start(raw: list[Any]) -> float | None:
    """The ``timestamp`` of the first ``*_start`` event among a stream's first entries."""
    for _, fields in raw:
        event = json.loads(fields[b"event"])
        if str(event.get("event", "")).endswith("_start"):
            stamp = event["timestamp"]
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return None


def starts(acc: Accountant, system: System, keys: list[str]) -> dict[str, float]:
    client = acc.client
    if system.start_source == "stamp":
        raw = client.hgetall(STAMPS_KEY)
        return {k.decode(): float(v) for k, v in raw.items()}
    out: dict[str, float] = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.xrange(f"conveyor:stream:{job_id}", count=3)
        for job_id, raw in zip(chunk, pipe.execute(), strict=True):
            at = _event_start(raw)
            if at is not None:
                out[job_id] = at
    return out


def measure(
    acc: Accountant,
    group: procs.Group,
    system: System,
    env: dict[str, str],
    rate: float,
    seconds: float,
    work: Path,
    wait_s: float = 90.0,
) -> dict[str, Any]:
    """One latency phase of ``system`` (its workers already running)."""
    acc.client.delete(STAMPS_KEY)
    out = work / f"latency-{system.key}-{rate:g}.json"
    argv = [
        sys.executable,
        "-m",
        "bench.compare_parts.producer",
        system.producer,
        "rate",
        f"--redis-url={env['BENCH_REDIS_URL']}",
        f"--rate={rate:g}",
        f"--seconds={seconds:g}",
        f"--warmup={WARMUP_S:g}",
        f"--out={out}",
    ]
    producer = group.start(f"producer-rate-{system.key}", argv, env)
    producer.popen.wait(seconds + WARMUP_S + 60)
    if producer.popen.returncode != 0:
        raise RuntimeError(f"{system.key}: the latency producer failed:\n{producer.tail()}")
    group.stop([producer])
    sent = json.loads(out.read_text())
    sends = [(key, at) for key, at, warm in sent["sends"] if not warm]
    all_keys = [key for key, _, _ in sent["sends"]]
    poller = Poller(acc, system)
    deadline = time.perf_counter() + wait_s
    done_waiting = False
    while time.perf_counter() < deadline:
        _, outstanding = poller.read()
        if outstanding == 0:
            if system.start_source == "stamp" and acc.client.hlen(STAMPS_KEY) < len(all_keys):
                time.sleep(0.05)  # popped but not yet started (no acknowledgement to wait for)
                continue
            done_waiting = True
            break
        time.sleep(0.05)
    got = starts(acc, system, [k for k, _ in sends])
    lat = sorted((got[k] - at) * 1000 for k, at in sends if k in got)
    return {
        "offered_per_s": sent["offered_per_s"],
        "scheduled_per_s": rate,
        "producer_late_max_ms": sent["late_max_ms"],
        "jobs": len(sends),
        "started": len(lat),
        "missing": len(sends) - len(lat),
        "all_done": done_waiting,
        "p50_ms": round(percentile(lat, 0.50), 2),
        "p95_ms": round(percentile(lat, 0.95), 2),
        "p99_ms": round(percentile(lat, 0.99), 2),
        "max_ms": round(lat[-1], 2) if lat else None,
    }
