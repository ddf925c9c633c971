"""Episodes per second through the whole path, against its baselines, measured in one run.

    .venv/bin/python -m bench.episodes [--records 20000] [--slow-records 5000] [--workers 1]

Issue 4's benchmark (see bench/README.md for how to read it). On fresh embedded Valkey and
Postgres (or ``--redis-url`` / ``--database-url``), with the ``episodes`` pool exactly as
configured (``CONVEYOR_EPISODES_*`` from the environment apply), it measures four tasks drained
by the same worker command (``conveyor worker episodes``, ``--workers`` of them):

- ``batched``: ``episodes.record``, the real path: ``submit_many``, packed (up to
  ``CONVEYOR_EPISODES_PACK`` records a message), batched insert, acknowledged after commit;
- ``batched-noop``: the same packing and batching mechanism with nothing to write;
- ``one-row``: a plain Celery task inserting one row per message (the baseline);
- ``plain-noop``: a plain Celery task doing nothing (Celery's floor per message);

and, with no queue at all, the same rows written straight to Postgres: multi-row VALUES, 500
a statement (the code ``episodes.record`` uses), and COPY, 5,000 a batch (the ceiling).

For each task: **drain**, records/s emptying a pre-loaded queue (first message taken to last
acknowledged, and for the writing tasks every row verified); **pipeline**, records/s from the
first ``submit_many`` to the last commit while submitting as fast as one producer can, with
p50/p99 of submit -> committed; **latency** at a fixed offered rate, p50/p99 of submit ->
committed; and CPU per record of the workers, Postgres and Redis (from /proc: unlike wall
clock, it hardly depends on what else runs on the machine). The load average is printed with
the figures: compare the ratios measured in one run.

Every process it starts runs in its own process group and is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "episodes"
TASKS = {
    "batched": "episodes.record",
    "batched-noop": "bench.episodes_noop",
    "one-row": "bench.episode_one_row",
    "plain-noop": "bench.noop",
}
WRITES = {"batched", "one-row"}
#: Sent many records a message (as ``submit_many`` sends episodes); the others one a message.
PACKED = {"batched", "batched-noop"}
#: Records one ``submit_many`` call sends: pre-loading, pipeline, fixed-rate phases. A packed
#: message holds at most this many (and at most ``CONVEYOR_EPISODES_PACK``).
PRELOAD_CHUNK, PIPELINE_CHUNK, RATE_CHUNK = 500, 50, 20
_WORDS = [
    "model",
    "answer",
    "context",
    "token",
    "prompt",
    "session",
    "user",
    "latency",
    "vector",
    "search",
    "index",
    "queue",
    "batch",
    "commit",
    "worker",
    "retry",
    "broker",
    "memory",
    "episode",
    "summary",
    "python",
    "celery",
    "redis",
    "postgres",
    "json",
]


# --- Processes ----------------------------------------------------------------------------------


@dataclass
class Worker:
    popen: subprocess.Popen
    log: Path


def start_workers(n: int, env: dict[str, str], logs: Path, mode: str) -> list[Worker]:
    workers = []
    for i in range(n):
        log = logs / f"{mode}-{i}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers.cli",
                    "worker",
                    QUEUE,
                    "--loglevel=WARNING",  # a log line per message would cost the plain tasks
                    f"--hostname=bench-{mode}-{i}@%h",
                    "-I",
                    "bench.episodes_tasks",
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        workers.append(Worker(popen, log))
    return workers


def stop_workers(workers: list[Worker]) -> None:
    for w in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.popen.pid, signal.SIGTERM)
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.popen.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.popen.wait(5)


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their live descendants."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


# --- Records ------------------------------------------------------------------------------------


def _text(rng: random.Random, chars: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def make_records(n: int, tag: str, seed: int = 4) -> list[dict[str, Any]]:
    """Realistic episodes: ~250 characters of prompt, ~500 of response, a little metadata."""
    rng = random.Random(seed)
    return [
        {
            "user_id": f"user-{i % 97}",
            "session_id": tag,
            "model_type": "local:llama3-8b",
            "prompt": _text(rng, 250),
            "response": _text(rng, 500),
            "tokens": {"prompt": 60, "completion": 120},
            "latency_ms": 850.0,
            "status": "success",
            "metadata": {"n": i, "source": "bench"},
        }
        for i in range(n)
    ]


def stamped(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with their submit time (epoch seconds) in metadata, just before sending."""
    now = time.time()
    return [{**r, "metadata": {**r["metadata"], "t": now}} for r in records]


# --- Measuring ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, redis_url: str, database_url: str, home: Path):
        import redis
        from sqlalchemy import create_engine

        import celeryconfig
        from conveyor import Submitter
        from workers import settings
        from workers.observability.queues import queue_keys
        from workers.store.db import sqlalchemy_url

        self.args = args
        self.home = home
        self.redis = redis.Redis.from_url(redis_url)
        self.engine = create_engine(sqlalchemy_url(database_url))
        self.submitter = Submitter()
        options = celeryconfig.broker_transport_options
        self.queue_keys = queue_keys(QUEUE, options["priority_steps"], options["sep"])
        self.env = {**os.environ}
        self.pool = settings.pool(QUEUE)
        self.batch_size = settings.episodes().batch_size
        self.flush_ms = settings.episodes().flush_ms
        self.pack = self.submitter.config.episodes_pack
        self.redis_pid: int | None = None
        self.postgres_pid: int | None = None

    # -- plumbing

    def outstanding(self) -> tuple[int, int]:
        pipe = self.redis.pipeline(transaction=False)
        for key in self.queue_keys:
            pipe.llen(key)
        pipe.hlen("unacked")
        counts = pipe.execute()
        return sum(counts[:-1]), counts[-1]

    def rows(self, tag: str) -> int:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return conn.execute(
                text("SELECT count(*) FROM episodic_logs WHERE session_id = :t"), {"t": tag}
            ).scalar_one()

    def reset(self) -> None:
        from sqlalchemy import text

        self.redis.delete(*self.queue_keys, "unacked", "unacked_index")
        with self.engine.begin() as conn:
            conn.execute(text("TRUNCATE episodic_logs"))

    def send(self, mode: str, records: list[dict[str, Any]]) -> None:
        """``submit_many`` for the public task (packed: up to ``CONVEYOR_EPISODES_PACK``
        records a message); the same send path for the bench-only tasks, packed the same way
        for ``batched-noop`` and one message per record for the plain tasks."""
        task = TASKS[mode]
        if task == "episodes.record":
            self.submitter.submit_many(task, records)
            return
        import uuid

        self.submitter._send(
            task,
            [(str(uuid.uuid4()), record) for record in records],
            priority=5,
            countdown=None,
            eta=None,
            pack=self.pack if mode in PACKED else 1,
            queue=QUEUE,
        )

    def wait_done(self, mode: str, tag: str, n: int, timeout_s: float) -> float:
        """Perf-counter time when the queue is fully acknowledged (and, for the writing tasks,
        all ``n`` rows are there)."""
        deadline = time.perf_counter() + timeout_s
        while True:
            waiting, unacked = self.outstanding()
            now = time.perf_counter()
            if waiting + unacked == 0 and (mode not in WRITES or self.rows(tag) >= n):
                return now
            if now > deadline:
                raise TimeoutError(
                    f"{mode}: {waiting} waiting, {unacked} unacknowledged after {timeout_s} s"
                )
            time.sleep(0.01)

    def latencies(self, tag: str) -> list[float]:
        """Seconds from submit to the row's statement (``created_at``: the batch's start)."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return sorted(
                conn.execute(
                    text(
                        "SELECT extract(epoch FROM created_at) - (metadata->>'t')::float8"
                        " FROM episodic_logs WHERE session_id = :t"
                    ),
                    {"t": tag},
                ).scalars()
            )

    def last_commit(self, tag: str) -> float:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT extract(epoch FROM max(created_at)) FROM episodic_logs"
                    " WHERE session_id = :t"
                ),
                {"t": tag},
            ).scalar_one()

    def cpu(self, workers: list[Worker]) -> dict[str, float]:
        return {
            "workers": cpu_s([w.popen.pid for w in workers]),
            "postgres": cpu_s([self.postgres_pid]) if self.postgres_pid else 0.0,
            "redis": cpu_s([self.redis_pid]) if self.redis_pid else 0.0,
        }

    # -- phases

    def records_for(self, mode: str) -> int:
        return self.args.records if mode in ("batched", "batched-noop") else self.args.slow_records

    def preload(self, mode: str) -> dict[str, Any]:
        """Queue the mode's backlog once, through the real submit path, and keep a copy of the
        queue's lists: every round drains exactly the same messages."""
        n = self.records_for(mode)
        self.reset()
        records = make_records(n, f"{mode}-drain")
        t = time.perf_counter()
        for i in range(0, n, PRELOAD_CHUNK):
            self.send(mode, records[i : i + PRELOAD_CHUNK])
        submit_rate = n / (time.perf_counter() - t)
        lists = {key: self.redis.dump(key) for key in self.queue_keys if self.redis.exists(key)}
        messages = self.outstanding()[0]
        return {"n": n, "messages": messages, "lists": lists, "submit_per_s": round(submit_rate, 1)}

    def drain(self, mode: str, backlog: dict[str, Any]) -> dict[str, Any]:
        """Start the workers on the pre-loaded queue; records/s from the first message taken
        to the last acknowledged (every row verified), and CPU per record meanwhile."""
        n = backlog["n"]
        self.reset()
        for key, dumped in backlog["lists"].items():
            self.redis.restore(key, 0, dumped, replace=True)
        workers = start_workers(self.args.workers, self.env, self.home / "logs", mode)
        try:
            first = None
            # CPU from the moment the first message is taken: not the workers' start-up.
            while first is None:
                if self.outstanding()[0] < backlog["messages"]:
                    first = time.perf_counter()
                    cpu_before = self.cpu(workers)
                elif any(w.popen.poll() is not None for w in workers):
                    raise RuntimeError(f"{mode}: a worker exited: see {workers[0].log}")
                else:
                    time.sleep(0.005)
            done = self.wait_done(mode, f"{mode}-drain", n, timeout_s=600)
            cpu_after = self.cpu(workers)
        finally:
            stop_workers(workers)
        return {
            "per_s": round(n / (done - first), 1),
            "cpu_ms_per_record": {
                k: round((cpu_after[k] - cpu_before[k]) * 1000 / n, 3) for k in cpu_after
            },
        }

    def follow(self, mode: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The pipeline and fixed-rate phases, on freshly started workers."""
        self.reset()
        workers = start_workers(self.args.workers, self.env, self.home / "logs", mode)
        try:
            return self.pipeline(mode, self.records_for(mode)), self.fixed_rate(mode)
        finally:
            stop_workers(workers)

    def pipeline(self, mode: str, n: int, chunk: int = PIPELINE_CHUNK) -> dict[str, Any]:
        """One producer submits as fast as it can while the workers drain."""
        tag = f"{mode}-pipeline"
        records = make_records(n, tag, seed=5)
        start = time.time()
        for i in range(0, n, chunk):
            self.send(mode, stamped(records[i : i + chunk]))
        sent = time.time()
        self.wait_done(mode, tag, n, timeout_s=600)
        end = float(self.last_commit(tag)) if mode in WRITES else time.time()
        result: dict[str, Any] = {
            "records": n,
            "per_s": round(n / (end - start), 1),
            "submit_per_s": round(n / (sent - start), 1),
        }
        if mode in WRITES:
            result.update(_percentiles(self.latencies(tag)))
        return result

    def fixed_rate(self, mode: str, chunk: int = RATE_CHUNK) -> dict[str, Any] | None:
        """Submit at ``--rate`` records/s for ``--seconds``: latency when nothing is queued."""
        if mode not in WRITES:
            return None
        tag = f"{mode}-rate"
        n = int(self.args.rate * self.args.seconds)
        records = make_records(n, tag, seed=6)
        interval = chunk / self.args.rate
        start = time.perf_counter()
        for k, i in enumerate(range(0, n, chunk)):
            delay = start + k * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.send(mode, stamped(records[i : i + chunk]))
        offered = n / (time.perf_counter() - start)
        self.wait_done(mode, tag, n, timeout_s=600)
        return {
            "records": n,
            "offered_per_s": round(offered, 1),
            **_percentiles(self.latencies(tag)),
        }

    def raw(self) -> dict[str, Any]:
        """The same rows straight into Postgres, no queue: VALUES (500) and COPY (5,000)."""
        from conveyor.schemas.episodes import EpisodePayload
        from workers.store.episodes import episode_row, insert_episodes

        n = self.args.records
        results = {}
        for method in ("values", "copy"):
            self.reset()
            rows = [
                episode_row(EpisodePayload.model_validate(r), episode_id=f"raw-{method}-{i}")
                for i, r in enumerate(make_records(n, f"raw-{method}"))
            ]
            raw = self.engine.raw_connection()
            conn = raw.driver_connection
            conn.rollback()
            try:
                t = time.perf_counter()
                if method == "values":
                    conn.autocommit = True
                    for i in range(0, n, 500):
                        insert_episodes(conn, rows[i : i + 500])
                else:
                    for i in range(0, n, 5000):
                        _copy(conn, rows[i : i + 5000])
                elapsed = time.perf_counter() - t
            finally:
                conn.rollback()
                conn.autocommit = False
                raw.close()
            assert self.rows(f"raw-{method}") == n
            batch = 500 if method == "values" else 5000
            results[method] = {"records": n, "batch": batch, "per_s": round(n / elapsed, 1)}
        return results


def _copy(conn: Any, rows: list[tuple]) -> None:
    from workers.store.episodes import _COLUMNS

    columns = ", ".join(_COLUMNS)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    buffer.seek(0)
    with conn.cursor() as cur:
        # The same columns, without the table's constraints (the INSERT below checks them).
        cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS bench_copy ON COMMIT DELETE ROWS"
            f" AS SELECT {columns} FROM episodic_logs WITH NO DATA"
        )
        cur.copy_expert(f"COPY bench_copy ({columns}) FROM STDIN WITH (FORMAT csv)", buffer)
        select = columns.replace("timestamp", "coalesce(timestamp, now())", 1)
        cur.execute(
            f"INSERT INTO episodic_logs ({columns}) SELECT {select} FROM bench_copy"
            " ON CONFLICT (episode_id) DO NOTHING"
        )
    conn.commit()


def _median_drain(rounds: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The round with the median rate (its CPU figures with it), and every round's rate."""
    ordered = sorted(rounds, key=lambda d: d["per_s"])
    median = ordered[(len(ordered) - 1) // 2]
    return {"records": n, **median, "rounds_per_s": [d["per_s"] for d in rounds]}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(values[-1] * 1000, 1)}


# --- Report -------------------------------------------------------------------------------------


@dataclass
class Report:
    machine: dict[str, Any]
    config: dict[str, Any]
    modes: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def ratios(report: Report) -> dict[str, Any]:
    def drain(mode: str) -> float | None:
        return report.modes.get(mode, {}).get("drain", {}).get("per_s")

    def pipe(mode: str) -> float | None:
        return report.modes.get(mode, {}).get("pipeline", {}).get("per_s")

    return {
        "drain batched / one-row (target >= 10)": _ratio(drain("batched"), drain("one-row")),
        "drain batched / batched-noop (target >= 0.8)": _ratio(
            drain("batched"), drain("batched-noop")
        ),
        "drain batched / plain-noop": _ratio(drain("batched"), drain("plain-noop")),
        "drain batched / raw VALUES ceiling": _ratio(
            drain("batched"), report.raw.get("values", {}).get("per_s")
        ),
        "drain batched / raw COPY ceiling": _ratio(
            drain("batched"), report.raw.get("copy", {}).get("per_s")
        ),
        "pipeline batched / one-row": _ratio(pipe("batched"), pipe("one-row")),
        "pipeline batched / batched-noop": _ratio(pipe("batched"), pipe("batched-noop")),
    }


def print_report(report: Report) -> None:
    print("\n== episodes benchmark ==")
    print("machine:", json.dumps(report.machine))
    print("config: ", json.dumps(report.config))
    head = (
        f"{'task':<14}{'rec/msg':>8}{'drain/s':>10}{'pipeline/s':>12}{'submit/s':>10}"
        f"{'pipe p50':>10}{'pipe p99':>10}{'rate p50':>10}{'rate p99':>10}"
        "   cpu ms/record (workers pg redis)"
    )
    print("\n" + head)
    for mode, m in report.modes.items():
        cpu = m["drain"]["cpu_ms_per_record"]
        p, lat = m["pipeline"], m["latency"] or {}
        print(
            f"{mode:<14}{m['records_per_message']:>8g}{m['drain']['per_s']:>10,.0f}{p['per_s']:>12,.0f}{m['submit_per_s']:>10,.0f}"
            f"{_ms(p.get('p50_ms')):>10}{_ms(p.get('p99_ms')):>10}"
            f"{_ms(lat.get('p50_ms')):>10}{_ms(lat.get('p99_ms')):>10}"
            f"   {cpu['workers']:.3f} {cpu['postgres']:.3f} {cpu['redis']:.3f}"
        )
    for mode, m in report.modes.items():
        print(f"  {mode} drain rounds/s: {m['drain']['rounds_per_s']}")
    for method, r in report.raw.items():
        print(f"{'raw ' + method:<22}{r['per_s']:>10,.0f}   (no queue, {r['batch']} a batch)")
    print()
    for name, value in report.ratios.items():
        print(f"  {name:<48} {value}")
    print()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}ms"


# --- Main ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.episodes", description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=10_000, help="records per batched phase")
    p.add_argument(
        "--slow-records", type=int, default=3_000, help="records per one-row / plain-noop phase"
    )
    p.add_argument("--workers", type=int, default=1, help="`conveyor worker episodes` processes")
    p.add_argument("--rounds", type=int, default=3, help="drains of each task (the median counts)")
    p.add_argument("--rate", type=float, default=200.0, help="offered records/s, latency phase")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the latency phase")
    p.add_argument(
        "--modes", default=",".join(TASKS), help=f"which of {','.join(TASKS)} (default: all)"
    )
    p.add_argument("--no-raw", action="store_true", help="skip the no-queue ceiling")
    p.add_argument("--redis-url", help="a Redis it may flush (default: an embedded Valkey)")
    p.add_argument("--database-url", help="a Postgres database it may truncate (default: embedded)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown modes: {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    home = Path(tempfile.mkdtemp(prefix="conveyor-bench-episodes-"))
    (home / "logs").mkdir()
    stops = []
    try:
        from workers.dev.embedded import EmbeddedPostgres, EmbeddedRedis

        redis_pid = postgres_pid = None
        redis_url = args.redis_url
        if not redis_url:
            valkey = EmbeddedRedis(home / "valkey", persist=False)
            redis_url = valkey.start()
            stops.append(valkey.stop)
            redis_pid = valkey.pid
        database_url = args.database_url
        if not database_url:
            pg = EmbeddedPostgres(home / "pg")
            pg.start()
            stops.append(pg.stop)
            database_url = pg.create_database("conveyor_bench")
            postgres_pid = pg.pid
        os.environ.update(
            REDIS_URL=redis_url,
            CELERY_BROKER_URL=redis_url,
            CELERY_RESULT_BACKEND=redis_url,
            DATABASE_URL=database_url,
            CONVEYOR_HOME=str(home / "conveyor"),
            CONVEYOR_ENV="dev",
        )
        from workers.store.migrate import upgrade

        upgrade(database_url)
        bench = Bench(args, redis_url, database_url, home)
        bench.redis_pid, bench.postgres_pid = redis_pid, postgres_pid
        bench.redis.flushdb()
        report = Report(
            machine={"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()]},
            config={
                "workers": args.workers,
                "pool": bench.pool.pool,
                "concurrency": bench.pool.concurrency,
                "prefetch_multiplier": bench.pool.prefetch_multiplier,
                "batch_size": bench.batch_size,
                "pack": bench.pack,
                "submit_many_chunks": {
                    "preload": PRELOAD_CHUNK,
                    "pipeline": PIPELINE_CHUNK,
                    "rate": RATE_CHUNK,
                },
                "flush_ms": bench.flush_ms,
                "records": args.records,
                "slow_records": args.slow_records,
                "rounds": args.rounds,
                "latency_phase": f"{args.rate:g}/s for {args.seconds:g} s",
            },
        )
        backlogs = {}
        for mode in modes:
            print(f"-- {mode} ({TASKS[mode]}): pre-loading ...", flush=True)
            backlogs[mode] = bench.preload(mode)
        drains: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for r in range(args.rounds):  # interleaved, so a busy spell does not hit one task only
            for mode in modes:
                drains[mode].append(bench.drain(mode, backlogs[mode]))
                print(f"-- round {r + 1} {mode}: {json.dumps(drains[mode][-1])}", flush=True)
        for mode in modes:
            print(f"-- {mode}: pipeline and fixed rate ...", flush=True)
            pipeline, latency = bench.follow(mode)
            report.modes[mode] = {
                "task": TASKS[mode],
                "submit_per_s": backlogs[mode]["submit_per_s"],
                "records_per_message": round(backlogs[mode]["n"] / backlogs[mode]["messages"], 1),
                "drain": _median_drain(drains[mode], backlogs[mode]["n"]),
                "pipeline": pipeline,
                "latency": latency,
            }
            print("   " + json.dumps(report.modes[mode]), flush=True)
        if not args.no_raw:
            print("-- raw (no queue) ...", flush=True)
            report.raw = bench.raw()
        report.machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
        report.ratios = ratios(report)
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(asdict(report), indent=2))
        bench.submitter.close()
        bench.engine.dispose()
        return 0
    finally:
        for stop in reversed(stops):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
