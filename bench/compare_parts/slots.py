"""The issue's other figures, from the benchmarks that own them, run small on the same Valkey.

- **episodes ingested/s and search freshness**: ``python -m bench.episodes`` with
  ``--modes batched,one-row`` and a small backlog (about 40 s on 2 cores). Ingested/s is its
  ``batched`` drain (``episodes.record``: packed, batched insert) beside ``one-row`` (a plain
  Celery task, one row and one commit a message). Freshness is its fixed-rate phase
  (200 records/s): submit -> the row's ``created_at`` (the start of its batch's statement); the
  ``search`` column is a generated tsvector (GIN-indexed), so a committed row is searchable.
  It starts its own embedded Postgres and uses database 3 of the harness's Valkey.
- **AI streams in flight**: ``python -m bench.ai_inflight`` with 1,500 jobs (3 x 500 slots,
  its minimum), 5 s streams, one baseline round (about 50 s): peak and mean streams in flight
  and % of the limit, beside plain Celery prefork (``-c`` 2 x cores). Databases 1 and 2.

Each runs as a subprocess with a hard timeout; one that fails or overruns leaves its slot
saying how to run it alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.compare_parts.procs import ROOT

EPISODES_ARGS = [
    "--records=3000",
    "--slow-records=300",
    "--rounds=1",
    "--modes=batched,one-row",
    "--no-raw",
    "--seconds=2",
]
AI_ARGS = ["--jobs=1500", "--concurrency=500", "--stream-seconds=5", "--baseline-rounds=1"]


def _run(
    argv: list[str], env: dict[str, str], log: Path, timeout_s: float
) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            # It stops what it started on SIGTERM (its own handler); then the group goes.
            import os
            import signal

            os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(5)
            code = None
    return code, round(time.perf_counter() - t0, 1)


def episodes(redis_base: str, env: dict[str, str], work: Path, timeout_s: float) -> dict[str, Any]:
    out = work / "episodes.json"
    argv = [sys.executable, "-m", "bench.episodes", f"--redis-url={redis_base}/3", *EPISODES_ARGS]
    code, wall = _run([*argv, f"--json={out}"], env, work / "episodes.log", timeout_s)
    result: dict[str, Any] = {
        "command": "python -m bench.episodes " + " ".join(argv[3:]),
        "wall_s": wall,
    }
    if code != 0 or not out.exists():
        why = "timed out" if code is None else f"exit {code}"
        return {**result, "error": f"{why}: run `python -m bench.episodes`"}
    data = json.loads(out.read_text())
    modes = data["modes"]
    b, o = modes.get("batched", {}), modes.get("one-row", {})
    return {
        **result,
        "batched_drain_per_s": b.get("drain", {}).get("per_s"),
        "one_row_drain_per_s": o.get("drain", {}).get("per_s"),
        "batched_pipeline_per_s": b.get("pipeline", {}).get("per_s"),
        "one_row_pipeline_per_s": o.get("pipeline", {}).get("per_s"),
        "batched_fresh_p50_ms": (b.get("latency") or {}).get("p50_ms"),
        "batched_fresh_p99_ms": (b.get("latency") or {}).get("p99_ms"),
        "one_row_fresh_p50_ms": (o.get("latency") or {}).get("p50_ms"),
        "one_row_fresh_p99_ms": (o.get("latency") or {}).get("p99_ms"),
        "records_per_message": b.get("records_per_message"),
        "config": data.get("config"),
    }


def ai_inflight(
    redis_base: str, env: dict[str, str], work: Path, timeout_s: float
) -> dict[str, Any]:
    log = work / "ai_inflight.log"
    argv = [sys.executable, "-m", "bench.ai_inflight", f"--redis-url={redis_base}", *AI_ARGS]
    code, wall = _run(argv, env, log, timeout_s)
    result: dict[str, Any] = {
        "command": "python -m bench.ai_inflight " + " ".join(argv[3:]),
        "wall_s": wall,
    }
    figures = None
    for line in reversed(log.read_text(errors="replace").splitlines() if log.exists() else []):
        if line.startswith('{"bench": "ai_inflight"'):
            figures = json.loads(line)
            break
    if code is None or figures is None:
        why = "timed out" if code is None else f"exit {code}"
        return {**result, "error": f"{why}: run `python -m bench.ai_inflight`"}
    by = {p["system"]: p for p in figures["phases"]}
    ours, base = by.get("conveyor ai pool", {}), by.get("plain celery prefork", {})
    return {
        **result,
        "exit": code,
        "conveyor_peak_in_flight": ours.get("peak_in_flight"),
        "conveyor_mean_in_flight": round(ours.get("mean_in_flight", 0.0), 1),
        "conveyor_pct_of_limit": ours.get("pct_of_limit"),
        "conveyor_slots": ours.get("slots"),
        "conveyor_cpu_ms_per_job": ours.get("cpu_ms_per_job"),
        "baseline_peak_in_flight": base.get("peak_in_flight"),
        "baseline_slots": base.get("slots"),
        "baseline_pct_of_limit": base.get("pct_of_limit"),
    }
