"""The one table (markdown): every figure beside its baselines, the ratio to plain Celery's
defaults, and the issue's targets, met or not and by how much; plus the notes that say
exactly what each figure counts. Also writes the raw figures as JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: Table columns: (system key, heading).
COLUMNS = [
    ("conveyor", "Conveyor"),
    ("conveyor_c2", "Conveyor, c=2"),
    ("bare", "bare task, Conveyor settings"),
    ("celery_defaults", "Celery defaults"),
    ("celery_tuned", "Celery tuned"),
    ("dramatiq", "Dramatiq"),
    ("huey", "huey"),
]

#: Issue #16's targets: (id, what, comparison, value).
TARGETS = {
    "drain_ratio": ("maintenance.ping drain ≥ 2x Celery defaults", ">=", 2.0),
    "cpu": ("worker CPU ≤ 1.0 ms/job", "<=", 1.0),
    "round_trips": ("Redis round trips ≤ 6/job", "<=", 6.0),
    "p99_500": ("submit→start p99 ≤ 3 ms at 500/s", "<=", 3.0),
    "single": ("validated single submits ≥ 6,000/s", ">=", 6000.0),
    "packed": ("packed ≥ 50,000 jobs/s", ">=", 50000.0),
    "packed_ratio": ("packed ≥ 10x single", ">=", 10.0),
}


def _num(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, str):
        return v
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def verdict(target: str, measured: float | None) -> tuple[str, str]:
    _, op, goal = TARGETS[target]
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return f"{op.replace('>=', '≥').replace('<=', '≤')} {goal:g}", "not measured"
    if op == ">=":
        ok = measured >= goal
        factor = measured / goal if goal else math.inf
    else:
        ok = measured <= goal
        factor = goal / measured if measured else math.inf
    sign = "≥" if op == ">=" else "≤"
    if ok:
        how = f"**met** (by {100 * (factor - 1):.0f} %)" if factor != math.inf else "**met**"
    else:
        how = f"**NOT met** ({factor:.2f}x of target; {1 / factor:.1f}x short)"
    return f"{sign} {goal:g}", how


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "—"
    return f"{a / b:.2f}x"


def _lat(d: dict[str, Any] | None) -> str:
    if not d:
        return "—"
    s = f"{_num(d.get('p50_ms'), 1)} / {_num(d.get('p95_ms'), 1)} / {_num(d.get('p99_ms'), 1)}"
    off = d.get("offered_per_s")
    if off is not None and off < 0.9 * d.get("scheduled_per_s", off):
        s += f" (offered {off:,.0f}/s)"
    if d.get("saturated"):
        s += f" (saturated: {d['saturated']})"
    if d.get("missing"):
        s += f" ({d['missing']} not started)"
    return s


def build_rows(fig: dict[str, Any]) -> list[list[str]]:
    enq, drains, lat = fig.get("enqueue", {}), fig.get("drain", {}), fig.get("latency", {})
    slots = fig.get("slots", {})

    def best(key: str) -> dict[str, Any] | None:
        return (drains.get(key) or {}).get("best")

    def drain_val(key: str, field: str) -> Any:
        b = best(key)
        if not b:
            return None
        if field.startswith("redis."):
            return b["redis"].get(field.split(".", 1)[1])
        return b.get(field)

    def enq_val(key: str, field: str) -> Any:
        return (enq.get(key) or {}).get(field)

    rows: list[list[str]] = []

    def row(
        name: str, cells: dict[str, str], ratio: str, target: str | None, measured: Any
    ) -> None:
        t, v = verdict(target, measured) if target else ("", "")
        rows.append([name, *[cells.get(k, "—") for k, _ in COLUMNS], ratio, t, v])

    # --- enqueue
    enq_cols = ("conveyor", "bare", "celery_defaults", "celery_tuned", "dramatiq", "huey")
    cells = {k: _num(enq_val(k, "per_s")) for k in enq_cols}
    single = enq_val("conveyor", "per_s")
    row(
        "enqueue, single, jobs/s (one process)",
        cells,
        _ratio(single, enq_val("celery_defaults", "per_s")),
        "single",
        single,
    )
    cells = {k: _num(enq_val(k, "cpu_us_per_job")) for k in enq_cols}
    row(
        "enqueue, producer CPU µs/job",
        cells,
        _ratio(enq_val("conveyor", "cpu_us_per_job"), enq_val("celery_defaults", "cpu_us_per_job")),
        None,
        None,
    )
    cells = {
        k: f"{_num(enq_val(k, 'redis_commands_per_job'), 1)} / "
        f"{_num(enq_val(k, 'redis_round_trips_per_job'), 1)}"
        for k in enq_cols
        if k in enq and "per_s" in enq[k]
    }
    row("enqueue, Redis commands / round trips per job", cells, "", None, None)
    packed = enq_val("conveyor_many_episodes", "per_s")
    row(
        "enqueue, packed: `submit_many` episodes.record, jobs/s",
        {"conveyor": _num(packed)},
        "",
        "packed",
        packed,
    )
    row(
        "enqueue, packed ÷ single (Conveyor)",
        {"conveyor": _ratio(packed, single)},
        "",
        "packed_ratio",
        packed / single if packed and single else None,
    )
    row(
        "enqueue, `submit_many` maintenance.ping (not packed), jobs/s",
        {"conveyor": _num(enq_val("conveyor_many_ping", "per_s"))},
        "",
        None,
        None,
    )
    # --- drain
    drain_cols = [k for k, _ in COLUMNS]
    base = drain_val("celery_defaults", "per_s")
    cells = {k: _num(drain_val(k, "per_s")) for k in drain_cols}
    ours = drain_val("conveyor", "per_s")
    row(
        "drain, jobs/s",
        cells,
        _ratio(ours, base)
        + (
            f" (c=2: {_ratio(drain_val('conveyor_c2', 'per_s'), base)})"
            if best("conveyor_c2")
            else ""
        ),
        "drain_ratio",
        ours / base if ours and base else None,
    )
    cells = {k: _num(drain_val(k, "cpu_ms_per_job"), 2) for k in drain_cols}
    row(
        "drain, worker CPU ms/job (user+sys, children incl.)",
        cells,
        _ratio(
            drain_val("conveyor", "cpu_ms_per_job"), drain_val("celery_defaults", "cpu_ms_per_job")
        ),
        "cpu",
        drain_val("conveyor", "cpu_ms_per_job"),
    )
    cells = {k: _num(drain_val(k, "valkey_cpu_ms_per_job"), 2) for k in drain_cols}
    row(
        "drain, Valkey CPU ms/job",
        cells,
        _ratio(
            drain_val("conveyor", "valkey_cpu_ms_per_job"),
            drain_val("celery_defaults", "valkey_cpu_ms_per_job"),
        ),
        None,
        None,
    )
    cells = {k: _num(drain_val(k, "redis.commands_per_job"), 1) for k in drain_cols}
    row(
        "drain, Redis commands/job (scripts' commands incl.)",
        cells,
        _ratio(
            drain_val("conveyor", "redis.commands_per_job"),
            drain_val("celery_defaults", "redis.commands_per_job"),
        ),
        None,
        None,
    )
    cells = {k: _num(drain_val(k, "redis.round_trips_per_job"), 1) for k in drain_cols}
    row(
        "drain, Redis round trips/job",
        cells,
        _ratio(
            drain_val("conveyor", "redis.round_trips_per_job"),
            drain_val("celery_defaults", "redis.round_trips_per_job"),
        ),
        "round_trips",
        drain_val("conveyor", "redis.round_trips_per_job"),
    )
    # --- latency
    for rate, target in (("200", None), ("500", "p99_500")):
        cells = {k: _lat((lat.get(k) or {}).get(rate)) for k in drain_cols}
        ours_l = (lat.get("conveyor") or {}).get(rate) or {}
        base_l = (lat.get("celery_defaults") or {}).get(rate) or {}
        row(
            f"submit→start p50 / p95 / p99 ms at {rate}/s offered",
            cells,
            _ratio(ours_l.get("p99_ms"), base_l.get("p99_ms")) + " (p99)"
            if ours_l and base_l
            else "—",
            target,
            ours_l.get("p99_ms") if ours_l else None,
        )
    # --- slots
    ep = slots.get("episodes") or {}
    if ep and "error" not in ep:
        row(
            "episodes ingested/s (drain; bare column: plain one-row task)",
            {
                "conveyor": _num(ep.get("batched_drain_per_s")),
                "bare": _num(ep.get("one_row_drain_per_s")),
            },
            _ratio(ep.get("batched_drain_per_s"), ep.get("one_row_drain_per_s")) + " (÷ one-row)",
            None,
            None,
        )
        row(
            "search freshness, submit→committed p50 / p99 ms at 200 records/s",
            {
                "conveyor": f"{_num(ep.get('batched_fresh_p50_ms'))} / "
                f"{_num(ep.get('batched_fresh_p99_ms'))}",
                "bare": f"{_num(ep.get('one_row_fresh_p50_ms'))} / "
                f"{_num(ep.get('one_row_fresh_p99_ms'))}",
            },
            "",
            None,
            None,
        )
    else:
        msg = (
            ep.get("error", "run `python -m bench.episodes`")
            if ep
            else "run `python -m bench.episodes`"
        )
        row("episodes ingested/s", {"conveyor": msg}, "", None, None)
        row("search freshness", {"conveyor": msg}, "", None, None)
    ai = slots.get("ai_inflight") or {}
    if ai and "error" not in ai:
        row(
            "AI streams in flight, peak / mean (% of limit)",
            {
                "conveyor": f"{_num(ai.get('conveyor_peak_in_flight'))} / "
                f"{_num(ai.get('conveyor_mean_in_flight'))} "
                f"({_num(ai.get('conveyor_pct_of_limit'), 1)} % of limit)",
                "celery_defaults": f"{_num(ai.get('baseline_peak_in_flight'))} "
                f"(prefork -c {ai.get('baseline_slots')})",
            },
            _ratio(ai.get("conveyor_peak_in_flight"), ai.get("baseline_peak_in_flight"))
            + " (peak)",
            None,
            None,
        )
    else:
        msg = (
            ai.get("error", "run `python -m bench.ai_inflight`")
            if ai
            else "run `python -m bench.ai_inflight`"
        )
        row("AI streams in flight", {"conveyor": msg}, "", None, None)
    return rows


def table(fig: dict[str, Any]) -> str:
    head = ["figure", *[h for _, h in COLUMNS], "Conveyor ÷ Celery defaults", "target", "verdict"]
    rows = build_rows(fig)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def load_line(fig: dict[str, Any]) -> str:
    """How much of the machine other processes took while the drains ran."""
    others = [d["best"]["others_busy_pct"] for d in fig.get("drain", {}).values() if d.get("best")]
    run = fig["run"]
    text = f"load average {run['load_before']} before, {run.get('load_after')} after"
    if others:
        text += (
            f"; processes outside the test took {min(others):.0f}-{max(others):.0f} % of the "
            "machine during the reported drains: compare ratios, not absolute figures"
        )
    return text


def notes(fig: dict[str, Any]) -> str:
    run = fig["run"]
    out = [
        f"Run {run['started']} on {run['cpus']} cores, {run['wall_s']:.0f} s wall; load average "
        f"{run['load_before']} before, {run['load_after']} after; versions {run['versions']}.",
        f"Drains: best of {run['rounds']} round(s) per system (other load on this machine only "
        "slows a round down; every round is in compare.json).",
        "",
        "Concurrency story (drain and latency): two processes execute jobs, one per core, except "
        "Conveyor as shipped (one):",
    ]
    for key, d in fig.get("drain", {}).items():
        if "story" in d:
            b = d.get("best") or {}
            rounds = ", ".join(f"{r['per_s']:,.0f}" for r in d.get("rounds", []))
            out.append(
                f"- **{key}**: {d['story']}; {d.get('jobs', '?')} jobs; "
                f"rounds jobs/s: {rounds}; machine {b.get('machine_busy_pct', '?')} % busy, "
                f"{b.get('others_busy_pct', '?')} % by processes not in the test."
            )
        elif "skipped" in d:
            out.append(f"- **{key}**: skipped: {d['skipped']}")
    out.append("")
    out.append(
        "Redis commands per job in the drain, by command (scripts' inner commands included):"
    )
    for key, d in fig.get("drain", {}).items():
        b = d.get("best")
        if b:
            parts = ", ".join(
                f"{c} {n:g}" for c, n in list(b["redis"]["commands_by_name_per_job"].items())[:12]
            )
            out.append(f"- {key}: {parts}")
    for name, e in fig.get("enqueue", {}).items():
        if "skipped" in e:
            out.append(f"- enqueue {name}: skipped: {e['skipped']}")
    prof = fig.get("profile")
    if prof and "roles" in prof:
        out += [
            "",
            f"Profile of `{prof['system']}` during an extra drain (py-spy, {prof['rate_hz']} Hz; "
            "% of the process's samples, which py-spy takes of threads running or waiting for a "
            "core: on a loaded machine a thread woken from a sleep counts until it runs):",
        ]
        for role, p in prof["roles"].items():
            comps = ", ".join(f"{c} {pct:g}" for c, pct in p["self_by_component"])
            on_stack = "; ".join(f"`{f}` {pct:g}" for f, pct in p["inclusive"][:14])
            on_top = "; ".join(f"`{f}` {pct:g}" for f, pct in p["self"][:8])
            out += [
                f"- **{role}**, {p['samples']} samples on CPU; self time by component: {comps}",
                "  - known places (anywhere on the stack): "
                + "; ".join(f"{label.strip()} {pct:g}" for label, pct in p.get("probes", [])),
                f"  - most often on the stack (below the main loop): {on_stack}",
                f"  - on top of the stack (self): {on_top}",
            ]
    elif prof:
        out.append(f"Profile: {prof.get('error')}")
    return "\n".join(out)


METHOD = """\
What each figure counts:

- **enqueue, single**: one producer process (fresh, its library only), 50 untimed warm-up
  jobs, then one API call a job for up to `--enqueue-jobs` jobs or `--enqueue-seconds`:
  Conveyor `Submitter.submit("maintenance.ping", {})` (validated, job index written), the bare
  task's and Celery defaults' `apply_async()`, Celery tuned `send_task` on one held producer,
  Dramatiq `send()`, huey calling the task. CPU: `time.process_time()` of that process. Redis
  per job: `INFO` commands and read events over the timed loop.
- **enqueue, packed**: `submit_many("episodes.record", 500 records)` a call, packed
  `CONVEYOR_EPISODES_PACK` a message; `submit_many("maintenance.ping", 500)` is shown too: it is
  validated and sent over one connection but not packed (one message a job).
- **drain**: the backlog pre-loaded (then DUMP/RESTOREd each round), workers started, timed
  from the first message taken to the last finished (nothing waiting and nothing unacknowledged;
  for Celery defaults, which acknowledge early, and huey, which pops, the last *taken*),
  polled every 5 ms. jobs/s = backlog ÷ that window.
- **worker CPU ms/job**: user + system of the worker process trees over the window
  (psutil; prefork/dramatiq/huey children included, recycled children through the parent's
  `children_*`), ÷ jobs. **Valkey CPU ms/job**: the server process over the same window.
- **Redis commands/job**: `total_commands_processed` delta over the window (= `commandstats`
  sum; a Lua script's `redis.call`s count, as does the `EVALSHA`), ÷ jobs.
  **Redis round trips/job**: `total_reads_processed` delta: read events on client sockets
  (a single command, a pipeline or a script call each arrive in one read), ÷ jobs. Both exclude
  the harness's own polls and `INFO`s (counted client-side), and include the system's idle
  traffic in the window (blocking-pop timeouts, heartbeats).
- **submit→start**: open-loop producer at the offered rate (5 s at 200/s, 4 s at 500/s, after
  0.5 s of warm-up), send time = `time.time()` before the call; start = `time.time()` written by
  the task as its first statement (baselines, bare task) or Conveyor's `maintenance_start` event
  timestamp (ms resolution, truncated: may read up to 1 ms low). "offered" is shown when the
  producer could not reach the schedule.
- **episodes / AI**: `bench.episodes` and `bench.ai_inflight` run small
  (see `bench/compare_parts/slots.py`).
"""


def write(fig: dict[str, Any], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = table(fig)
    md = (
        "# `make bench`: Conveyor beside its baselines, one run\n\n"
        + text
        + "\n\n"
        + "Load: "
        + load_line(fig)
        + ".\n\n"
        + notes(fig)
        + "\n\n"
        + METHOD
    )
    (out_dir / "compare.md").write_text(md)
    (out_dir / "compare.json").write_text(json.dumps(fig, indent=2, default=str))
    return text
