"""What the HTTP gateway costs and holds: submits, one busy event stream, many idle ones.

    .venv/bin/python -m bench.gateway [--connections 10000] [--rates 25,100,200] [--events 20000]

The gateway's benchmark (about 3 minutes on 2 cores). On an embedded Valkey (or
``--redis-url``), one ``conveyor gateway`` process (dev mode, no API keys;
``CONVEYOR_GATEWAY_RATE_LIMIT`` raised out of the way: the default, 200/second per key, and in
dev mode every request is the one key "dev", would refuse most of phase 1 with 429s) and, for
the latency rows, one ``conveyor worker maintenance`` as configured (``--loglevel=WARNING``),
it measures in one run:

1. **Submits.** ``POST /api/v1/jobs`` of ``maintenance.ping`` (``hold_s`` 0) from a lean
   asyncio HTTP/1.1 client (raw sockets, keep-alive, ``--concurrency`` requests in flight,
   closed loop, no worker running) beside the library, ``conveyor.Submitter().submit``, on one
   thread and on ``--concurrency`` threads: submits/s, and CPU per submit of the gateway (and
   of its event-loop thread), of Redis and of the client. Then, with the worker running, the
   worker's drain rate (a pre-loaded queue), and at each ``--rates`` offered load, open loop
   (requests sent on a schedule, not back-to-back, ``--rate-seconds`` each), the latency from
   the POST (the library: the ``submit`` call) to the job's start: the ``timestamp`` of its
   ``maintenance_start`` event (the worker's clock, the same machine's; milliseconds,
   floored), p50/p90/p99, beside the answer time of the POST/``submit`` itself.
2. **Events/s one SSE subscriber follows.** A fake indexed job; ``EventPublisher`` publishes
   ``--events`` events to it (the last one terminal); one ``GET /api/v1/jobs/{id}/events``
   client (a separate process, raw socket, SSE parsed) receives them, end to end (first
   publish to last event received). ``paced``: the publisher keeps at most ``--window`` events
   ahead of what the subscriber got (below the gateway's per-client buffer, 1000: nothing is
   dropped), which gives the sustained rate; ``burst``: everything published as fast as Redis
   takes it (what overflows the buffer comes as gap markers). Baseline in the same run: a
   plain redis-py pub/sub subscriber on the job's channel, same publisher. Whether the stream
   ended after the terminal event is checked too.
3. **Idle SSE connections one gateway process holds.** ``--connections`` event streams to fake
   jobs that never end, opened ``--open-concurrency`` at a time from this process (asyncio,
   raw sockets): the first ``--own-jobs`` one job each, the rest spread over
   ``--shared-jobs`` jobs. The gateway's RSS (psutil) before, after each ``--stage`` and with
   all open; KB per connection; the most streams open at the same moment (streams the
   gateway itself closes are counted, with how they ended); its CPU while they idle (a window
   longer than one keep-alive interval, ``CONVEYOR_GATEWAY_KEEPALIVE``); then one event
   published to every shared job and to ``--probe-own`` own ones must reach exactly their
   connections (fan-out time); then every client leaves at once and the pub/sub channels
   still subscribed in Redis are counted (a leak check), and a second round of ``--again``
   streams is opened and closed the same way.

Everything shares the machine's cores with Valkey, the worker and the client (and whatever
else runs: each row says how busy the machine was, and how much of it was other processes);
the CPU per operation and the ratios measured in one run are the figures to compare. The
results, with the machine, the versions and the code measured (commit, uncommitted changes),
are printed and written to ``bench/results/gateway.md`` (``--out``). Every process it starts
runs in its own process group and is stopped at the end; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gateway.md"
TASK = "maintenance.ping"
QUEUE = "maintenance"
PAYLOAD = {"message": "bench", "hold_s": 0}
#: The gateway's per-key limit for the run (in dev mode every request is the key "dev").
RATE_LIMIT = "1000000/second"
#: The gateway's keep-alive comment interval (the project's default): idle CPU is measured
#: over a window a little longer than this.
KEEPALIVE_S = 15.0
#: The gateway's per-client event buffer (CONVEYOR_GATEWAY_CLIENT_BUFFER's default).
CLIENT_BUFFER = 1000


# --- Processes -----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def exceptions(self) -> dict[str, int]:
        """The exceptions its log reports, each with the innermost frame of the project's own
        code it passed through (``function (file:line)``), and how many times."""
        found: Counter[str] = Counter()
        ours = ""
        counted = False  # one count per logged error, however many tracebacks it prints
        with contextlib.suppress(OSError), open(self.log, errors="replace") as f:
            for line in f:
                if "ERROR" in line:  # uvicorn's "ERROR:", Celery's "ERROR/": a new report
                    ours, counted = "", False
                elif line.lstrip().startswith('File "') and f"{ROOT}/workers/" in line:
                    where, _, func = line.strip().partition(", in ")
                    path, _, number = where.rpartition(", line ")
                    name = Path(path.strip().removeprefix('File "').rstrip('"')).name
                    ours = f"{func} ({name}:{number})"
                elif (
                    line[:1].isalpha()
                    and ("Error: " in line or "Exception: " in line)
                    and "response already started" not in line
                    and not counted
                ):
                    found[f"{line.strip()[:120]} in {ours or '?'}"] += 1
                    counted = True
        return dict(found.most_common(5))

    def log_counts(self) -> dict[str, int]:
        counts = {"WARNING": 0, "ERROR": 0, "Traceback": 0}
        with contextlib.suppress(OSError), open(self.log, errors="replace") as f:
            for line in f:
                for word in counts:
                    if word in line:
                        counts[word] += 1
        return counts


class Processes:
    """Processes this run started, each in its own process group, all stopped by ``stop``."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[Proc] | None = None, timeout_s: float = 15.0) -> None:
        targets = list(self.procs if procs is None else procs)
        for proc in targets:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in targets:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
            if proc in self.procs:
                self.procs.remove(proc)


def _clean_env() -> dict[str, str]:
    """This environment without anything that would point a child elsewhere."""
    drop = ("REDIS_URL", "DATABASE_URL", "CELERY_", "LLM_", "CONVEYOR_", "N8N_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(ROOT)
    return env


# --- Measuring -----------------------------------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process, its live descendants and the children it reaped
    (a prefork pool recycles its children) (None: this process and its reaped children)."""
    import psutil

    if pid is None:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    total = 0.0
    for n, proc in enumerate(_tree(pid)):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
            if n == 0:
                total += t.children_user + t.children_system
    return total


def loop_thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (the gateway's event loop)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for thread in psutil.Process(pid).threads():
            if thread.id == pid:
                return thread.user_time + thread.system_time
    return 0.0


def rss(pid: int) -> int:

    return sum(p.memory_info().rss for p in _tree(pid))


class CpuMeter:
    """CPU seconds each named process (None: this one) spent between ``start`` and ``stop``;
    and how busy the whole machine was."""

    def __init__(self, pids: dict[str, int | None], loop_pid: int | None = None):
        self.pids = pids
        self.loop_pid = loop_pid  # also meter this process's main thread
        self.loop0 = self.loop_used = 0.0
        self.t0 = 0.0
        self.c0: dict[str, float] = {}
        self.m0: tuple[float, float] = (0.0, 0.0)
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self.machine_pct = 0.0
        self.others_pct = 0.0  # of the machine, by processes not in ``pids``

    @staticmethod
    def _machine() -> tuple[float, float]:
        import psutil

        t = psutil.cpu_times()
        return t.idle + getattr(t, "iowait", 0.0), sum(t)

    def start(self) -> CpuMeter:
        self.c0 = {name: cpu_s(pid) for name, pid in self.pids.items()}
        if self.loop_pid:
            self.loop0 = loop_thread_cpu_s(self.loop_pid)
        self.m0 = self._machine()
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> CpuMeter:
        self.wall = time.perf_counter() - self.t0
        self.used = {name: cpu_s(pid) - self.c0[name] for name, pid in self.pids.items()}
        if self.loop_pid:
            self.loop_used = loop_thread_cpu_s(self.loop_pid) - self.loop0
        idle, total = self._machine()
        d_idle, d_total = idle - self.m0[0], total - self.m0[1]
        self.machine_pct = 100.0 * (d_total - d_idle) / max(d_total, 1e-9)
        cores = os.cpu_count() or 1
        ours = sum(self.used.values()) / max(self.wall, 1e-9)
        self.others_pct = max(0.0, self.machine_pct - 100.0 * ours / cores)
        return self


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# --- A lean HTTP/1.1 client (the load must not cost more than what it loads) ----------------


def _post(port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _get(port: int, path: str, accept: str = "application/json") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n\r\n".encode()


class HttpConn:
    """One keep-alive connection: write a request, read its response (Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> HttpConn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


def _job_id(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(json.loads(body)["data"]["job_id"])
    return None


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# --- An incremental SSE reader over one HTTP response --------------------------------------------


@dataclass
class SSEMessage:
    event: str
    id: str | None
    data: bytes


class SSEParser:
    """Feed it the bytes of one HTTP response as they come; it returns SSE messages (the
    EventSource rules: ``id``, ``event``, ``data``; comments and ``retry`` skipped)."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.ended = False
        self.comments = 0  # blocks of comments only (the gateway's keep-alives)
        self._buf = bytearray()
        self._body = bytearray()
        self._head = True
        self._chunked = False
        self._need = -1  # chunked: -1 a size line next, -2 the CRLF after a chunk, >0 bytes

    def feed(self, data: bytes) -> list[SSEMessage]:
        self._buf += data
        if self._head:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return []
            head = bytes(self._buf[:end]).lower()
            del self._buf[: end + 4]
            self.status = int(head[9:12])
            self._chunked = b"transfer-encoding: chunked" in head
            self._head = False
        if self._chunked:
            self._dechunk()
        else:
            self._body += self._buf
            self._buf.clear()
        return self._messages()

    def _dechunk(self) -> None:
        buf = self._buf
        while buf:
            if self._need == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                del buf[: eol + 2]
                if size == 0:
                    self.ended = True
                    buf.clear()
                    return
                self._need = size
            elif self._need == -2:
                if len(buf) < 2:
                    return
                del buf[:2]
                self._need = -1
            else:
                take = min(len(buf), self._need)
                self._body += buf[:take]
                del buf[:take]
                self._need -= take
                if self._need == 0:
                    self._need = -2

    def _messages(self) -> list[SSEMessage]:
        out = []
        body = self._body
        while (end := body.find(b"\n\n")) >= 0:
            block = bytes(body[:end])
            del body[: end + 2]
            event, event_id, data = "message", None, []
            for line in block.split(b"\n"):
                if not line or line.startswith(b":"):
                    continue
                name, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if name == b"data":
                    data.append(value)
                elif name == b"id":
                    event_id = value.decode()
                elif name == b"event":
                    event = value.decode()
            if data:
                out.append(SSEMessage(event, event_id, b"\n".join(data)))
            elif block.startswith(b":"):
                self.comments += 1
        return out


# --- Phase 1: submits ----------------------------------------------------------------------------


@dataclass
class SubmitRun:
    system: str
    concurrency: int
    count: int = 0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    answer_p50_ms: float = 0.0
    answer_p99_ms: float = 0.0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per submit, by process
    loop_cpu_ms: float = 0.0  # per submit, the gateway's event-loop thread
    machine_pct: float = 0.0
    others_pct: float = 0.0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


async def _http_closed_loop(
    port: int, concurrency: int, seconds: float, meter: CpuMeter | None
) -> tuple[int, float, Counter[int], list[float]]:
    request = _post(port, "/api/v1/jobs", json.dumps({"task": TASK, "payload": PAYLOAD}).encode())
    conns = [await HttpConn.open(port) for _ in range(concurrency)]
    statuses: Counter[int] = Counter()
    answers: list[float] = []

    async def drive(conn: HttpConn, deadline: float, record: bool) -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            status, _ = await conn.request(request)
            if record:
                answers.append(time.perf_counter() - t)
                statuses[status] += 1

    try:
        warm = time.perf_counter() + 1.0
        await asyncio.gather(*(drive(c, warm, False) for c in conns))
        if meter:
            meter.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(drive(c, t0 + seconds, True) for c in conns))
        elapsed = time.perf_counter() - t0
        if meter:
            meter.stop()
    finally:
        for conn in conns:
            conn.close()
    return sum(statuses.values()), elapsed, statuses, answers


def _library_closed_loop(
    submitter: Any, threads: int, seconds: float, meter: CpuMeter | None
) -> tuple[int, float, Counter[str], list[float]]:
    outcomes: Counter[str] = Counter()
    answers: list[float] = []
    lock = threading.Lock()

    def drive(deadline: float, record: bool) -> None:
        mine: list[float] = []
        errors: Counter[str] = Counter()
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                submitter.submit(TASK, PAYLOAD)
                mine.append(time.perf_counter() - t)
            except Exception as exc:
                errors[type(exc).__name__] += 1
        if record:
            with lock:
                answers.extend(mine)
                outcomes["ok"] += len(mine)
                outcomes.update(errors)

    def run(deadline: float, record: bool) -> None:
        workers = [threading.Thread(target=drive, args=(deadline, record)) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    run(time.perf_counter() + 1.0, False)
    if meter:
        meter.start()
    t0 = time.perf_counter()
    run(t0 + seconds, True)
    elapsed = time.perf_counter() - t0
    if meter:
        meter.stop()
    return sum(outcomes.values()), elapsed, outcomes, answers


def run_submits(ctx: Context) -> list[SubmitRun]:
    args = ctx.args
    pids = ctx.pids()
    runs = []
    plan = [("gateway HTTP", args.concurrency), ("library", 1), ("library", args.concurrency)]
    for system, conc in plan:
        meter = CpuMeter(pids, loop_pid=ctx.gateway.pid)
        if system == "gateway HTTP":
            loop = _new_loop()
            try:
                count, elapsed, statuses, answers = loop.run_until_complete(
                    _http_closed_loop(ctx.port, conc, args.submit_seconds, meter)
                )
            finally:
                loop.close()
            status_counts = {str(k): v for k, v in sorted(statuses.items())}
            label = f"gateway HTTP ({conc} connections)"
        else:
            count, elapsed, outcomes, answers = _library_closed_loop(
                ctx.submitter, conc, args.submit_seconds, meter
            )
            status_counts = dict(outcomes)
            label = f"library Submitter.submit ({conc} thread{'s' if conc > 1 else ''})"
        run = SubmitRun(label, conc, count, elapsed, status_counts)
        run.answer_p50_ms = pct(answers, 50) * 1000
        run.answer_p99_ms = pct(answers, 99) * 1000
        run.cpu_ms = {k: v * 1000 / max(count, 1) for k, v in meter.used.items()}
        run.loop_cpu_ms = meter.loop_used * 1000 / max(count, 1)
        run.machine_pct, run.others_pct = meter.machine_pct, meter.others_pct
        runs.append(run)
        print(
            f"  {label}: {run.rate:.0f}/s, {status_counts}, "
            + ", ".join(f"{k} {v:.2f} ms CPU" for k, v in run.cpu_ms.items()),
            flush=True,
        )
        ctx.purge_queue()
    return runs


# --- Phase 1b: latency to the start event at a fixed offered load --------------------------------


@dataclass
class Sent:
    scheduled: float  # epoch seconds
    sent: float  # epoch seconds: the POST written / submit() called
    answered: float
    ok: bool
    job_id: str | None
    status: str


@dataclass
class LatencyRun:
    system: str
    rate: float
    sent: int = 0
    ok: int = 0
    started: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    achieved_rate: float = 0.0
    late_sends: int = 0  # sent > 5 ms after their schedule
    answer_p50_ms: float = 0.0
    answer_p99_ms: float = 0.0
    start_p50_ms: float = 0.0
    start_p90_ms: float = 0.0
    start_p99_ms: float = 0.0
    start_max_ms: float = 0.0
    gateway_cpu_pct: float = 0.0
    worker_cpu_pct: float = 0.0
    machine_pct: float = 0.0
    others_pct: float = 0.0


async def _http_open_loop(port: int, rate: float, seconds: float) -> list[Sent]:
    request = _post(port, "/api/v1/jobs", json.dumps({"task": TASK, "payload": PAYLOAD}).encode())
    idle: list[HttpConn] = [await HttpConn.open(port) for _ in range(8)]
    results: list[Sent] = []
    loop = asyncio.get_running_loop()

    async def one(scheduled: float) -> None:
        conn = idle.pop() if idle else await HttpConn.open(port)
        sent = time.time()
        try:
            status, body = await conn.request(request)
        except (OSError, asyncio.IncompleteReadError) as exc:
            conn.close()
            results.append(Sent(scheduled, sent, time.time(), False, None, type(exc).__name__))
            return
        results.append(
            Sent(scheduled, sent, time.time(), status == 202, _job_id(body), str(status))
        )
        idle.append(conn)

    n = int(rate * seconds)
    t0_loop = loop.time() + 0.05
    t0_wall = time.time() + 0.05
    tasks = []
    for i in range(n):
        delay = t0_loop + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(t0_wall + i / rate)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return results


def _library_open_loop(submitter: Any, rate: float, seconds: float) -> list[Sent]:
    results: list[Sent] = []
    lock = threading.Lock()

    def one(scheduled: float) -> None:
        sent = time.time()
        try:
            job = submitter.submit(TASK, PAYLOAD)
            item = Sent(scheduled, sent, time.time(), True, job.id, "ok")
        except Exception as exc:
            item = Sent(scheduled, sent, time.time(), False, None, type(exc).__name__)
        with lock:
            results.append(item)

    n = int(rate * seconds)
    with ThreadPoolExecutor(max_workers=32) as pool:
        t0 = time.perf_counter() + 0.05
        t0_wall = time.time() + 0.05
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, t0_wall + i / rate)
    return results


def start_times(client: Any, job_ids: list[str], timeout_s: float) -> dict[str, float]:
    """Epoch seconds of each job's ``maintenance_start`` event (its envelope's timestamp)."""
    from conveyor import keys
    from conveyor.streams import decode

    found: dict[str, float] = {}
    pending = list(job_ids)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        still = []
        for start in range(0, len(pending), 1000):
            batch = pending[start : start + 1000]
            pipe = client.pipeline(transaction=False)
            for job_id in batch:
                pipe.xrange(keys.events_stream(job_id), "-", "+", count=1)
            for job_id, entries in zip(batch, pipe.execute(), strict=True):
                event = decode(entries[0][1]) if entries else None
                if event and event.get("event") == "maintenance_start":
                    found[job_id] = _epoch(event["timestamp"])
                else:
                    still.append(job_id)
        pending = still
        if pending:
            time.sleep(0.25)
    return found


def run_latency(ctx: Context) -> tuple[float, list[LatencyRun]]:
    args = ctx.args
    drain = ctx.worker_drain_rate()
    print(f"  worker drain: {drain:.0f} jobs/s", flush=True)
    runs = []
    for rate in args.rates:
        for system in ("gateway HTTP", "library"):
            ctx.wait_queue_empty(60)
            meter = CpuMeter(ctx.pids(worker=ctx.worker.pid)).start()
            if system == "gateway HTTP":
                loop = _new_loop()
                try:
                    sent = loop.run_until_complete(
                        _http_open_loop(ctx.port, rate, args.rate_seconds)
                    )
                finally:
                    loop.close()
            else:
                sent = _library_open_loop(ctx.submitter, rate, args.rate_seconds)
            meter.stop()  # the sending window only
            ids = [s.job_id for s in sent if s.ok and s.job_id]
            starts = start_times(ctx.redis, ids, timeout_s=max(30.0, 3 * args.rate_seconds))
            run = LatencyRun(system, rate, sent=len(sent), ok=len(ids), started=len(starts))
            run.errors = dict(Counter(s.status for s in sent if not s.ok))
            span = max(s.sent for s in sent) - min(s.sent for s in sent) if sent else 0.0
            run.achieved_rate = (len(sent) - 1) / span if span else 0.0
            run.late_sends = sum(1 for s in sent if s.sent - s.scheduled > 0.005)
            answers = [s.answered - s.sent for s in sent if s.ok]
            by_id = {s.job_id: s for s in sent if s.ok and s.job_id}
            lat = [starts[j] - by_id[j].sent for j in starts]
            run.answer_p50_ms, run.answer_p99_ms = pct(answers, 50) * 1e3, pct(answers, 99) * 1e3
            run.start_p50_ms = pct(lat, 50) * 1e3
            run.start_p90_ms = pct(lat, 90) * 1e3
            run.start_p99_ms = pct(lat, 99) * 1e3
            run.start_max_ms = max(lat, default=math.nan) * 1e3
            run.gateway_cpu_pct = 100 * meter.used["gateway"] / meter.wall
            run.worker_cpu_pct = 100 * meter.used["worker"] / meter.wall
            run.machine_pct, run.others_pct = meter.machine_pct, meter.others_pct
            runs.append(run)
            print(
                f"  {system} @ {rate:g}/s: start p50 {run.start_p50_ms:.1f} ms, "
                f"p99 {run.start_p99_ms:.1f} ms; answer p50 {run.answer_p50_ms:.1f} ms; "
                f"{run.started}/{run.sent} started, errors {run.errors}",
                flush=True,
            )
    return drain, runs


# --- Phase 2: events/s one subscriber follows ----------------------------------------------------


def _sse_reader(port: int, job_id: str, last_seq: int, progress: Any, results: Any) -> None:
    """Child process: one SSE connection, read until the server ends it or ``last_seq`` was
    seen (as an event or inside a gap marker; then it waits up to 5 s for the end); the
    last seq seen so far in ``progress``."""

    async def read() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_get(port, f"/api/v1/jobs/{job_id}/events", "text/event-stream"))
        parser = SSEParser()
        events = gaps = gap_events = 0
        last = 0
        in_order = True
        first_at = last_at = 0.0
        ready = False
        closed = False
        end_by: float | None = None
        while not parser.ended:
            if end_by is not None:
                try:
                    data = await asyncio.wait_for(reader.read(65536), end_by - time.monotonic())
                except TimeoutError:
                    break  # everything arrived, but the stream stays open
            else:
                data = await reader.read(65536)
            if not data:
                closed = True
                break
            now = time.time()
            for message in parser.feed(data):
                if message.event == "gap":
                    gap = json.loads(message.data)
                    gaps += 1
                    gap_events += int(gap["to_seq"]) - int(gap["from_seq"]) + 1
                    in_order &= int(gap["from_seq"]) == last + 1
                    last = int(gap["to_seq"])
                    continue
                seq = int(message.id or 0)
                in_order &= seq == last + 1
                last = seq
                events += 1
                first_at = first_at or now
                last_at = now
            if parser.status is not None and not ready:
                ready = True
                results.put(("ready", parser.status))
            progress.value = last
            if last >= last_seq and end_by is None:
                end_by = time.monotonic() + 5.0
        writer.close()
        return {
            "server_closed": parser.ended or closed,
            "status": parser.status,
            "events": events,
            "gaps": gaps,
            "gap_events": gap_events,
            "last_seq": last,
            "in_order": in_order,
            "first_at": first_at,
            "last_at": last_at,
            "ended": parser.ended,
        }

    loop = _new_loop()
    try:
        results.put(("done", loop.run_until_complete(read())))
    except Exception as exc:
        results.put(("error", repr(exc)))
    finally:
        loop.close()


def _pubsub_reader(redis_url: str, job_id: str, progress: Any, results: Any) -> None:
    """Child process: a plain redis-py subscriber on the job's channel, to its terminal event."""
    import redis

    from conveyor import keys

    try:
        client = redis.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        pubsub.subscribe(keys.events_channel(job_id))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Redis confirms: nothing published is missed
            confirmation = pubsub.get_message(timeout=1.0)
            if confirmation and confirmation["type"] == "subscribe":
                break
        results.put(("ready", 200))
        events, last, in_order, first_at, last_at = 0, 0, True, 0.0, 0.0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message is None or message["type"] != "message":
                continue
            now = time.time()
            event = json.loads(message["data"])
            seq = int(event["seq"])
            in_order &= seq == last + 1
            last = seq
            events += 1
            first_at = first_at or now
            last_at = now
            progress.value = last
            if event["type"] in ("complete", "error"):
                break
        pubsub.close()
        results.put(
            (
                "done",
                {
                    "status": 200,
                    "events": events,
                    "gaps": 0,
                    "gap_events": 0,
                    "last_seq": last,
                    "in_order": in_order,
                    "first_at": first_at,
                    "last_at": last_at,
                    "ended": True,
                    "server_closed": True,
                },
            )
        )
    except Exception as exc:
        results.put(("error", repr(exc)))


@dataclass
class EventsRun:
    subscriber: str
    mode: str
    events: int
    delivered: int = 0
    gaps: int = 0
    gap_events: int = 0
    in_order: bool = False
    publish_s: float = 0.0
    end_to_end_s: float = 0.0
    gateway_cpu_us_per_event: float = 0.0
    server_closed: bool = False  # the stream ended after the last event
    error: str = ""

    @property
    def rate(self) -> float:
        return self.delivered / self.end_to_end_s if self.end_to_end_s else 0.0

    @property
    def publish_rate(self) -> float:
        return self.events / self.publish_s if self.publish_s else 0.0


def _publish_events(
    publisher: Any, job_id: str, n: int, progress: Any, window: int | None, batch: int
) -> tuple[float, float]:
    """Publish ``n`` events (the last one terminal); with a ``window``, never more than that
    many ahead of what the subscriber has. (epoch of the first publish, seconds it took)."""
    published = 0
    first = time.time()
    t0 = time.perf_counter()
    while published < n:
        room = batch if window is None else window - (published - progress.value)
        if room < min(batch, n - published):
            time.sleep(0.0002)
            continue
        for _ in range(min(batch, n - published, room)):
            published += 1
            last = published == n
            publisher.publish_soon(
                job_id,
                type="complete" if last else "update",
                component="maintenance",
                event="maintenance_complete" if last else "maintenance_progress",
                data={"n": published},
            )
        publisher.flush()
    return first, time.perf_counter() - t0


def run_events(ctx: Context) -> list[EventsRun]:
    from workers.runtime.events import EventPublisher

    args = ctx.args
    spawn = multiprocessing.get_context("spawn")
    runs = []
    plan = [
        ("redis pub/sub", "paced"),
        ("gateway SSE", "paced"),
        ("redis pub/sub", "burst"),
        ("gateway SSE", "burst"),
    ]
    for subscriber, mode in plan:
        job_id = str(uuid.uuid4())
        ctx.fake_jobs([job_id])
        progress = spawn.Value("q", 0, lock=False)
        results = spawn.Queue()
        target: Any
        reader_args: tuple[Any, ...]
        if subscriber == "gateway SSE":
            target, reader_args = _sse_reader, (ctx.port, job_id, args.events, progress, results)
        else:
            target, reader_args = _pubsub_reader, (ctx.redis_url, job_id, progress, results)
        reader = spawn.Process(target=target, args=reader_args, daemon=True)
        reader.start()
        run = EventsRun(subscriber, mode, args.events)
        try:
            kind, value = results.get(timeout=30)
            if kind != "ready" or value != 200:
                raise RuntimeError(f"{subscriber}: {kind} {value}")
            publisher = EventPublisher(
                ctx.redis, stream_maxlen=args.events + 1000, ttl_s=600, batch_s=3600
            )
            meter = CpuMeter({"gateway": ctx.gateway.pid}).start()
            window = args.window if mode == "paced" else None
            first, run.publish_s = _publish_events(
                publisher, job_id, args.events, progress, window, 50 if window else 200
            )
            kind, value = results.get(timeout=120)
            meter.stop()
            if kind != "done":
                raise RuntimeError(f"{subscriber}: {value}")
            run.delivered = value["events"]
            run.gaps, run.gap_events = value["gaps"], value["gap_events"]
            run.in_order = value["in_order"] and value["last_seq"] == args.events
            run.server_closed = value["server_closed"]
            run.end_to_end_s = value["last_at"] - first
            if subscriber == "gateway SSE":
                run.gateway_cpu_us_per_event = meter.used["gateway"] * 1e6 / max(run.delivered, 1)
        except Exception as exc:
            run.error = repr(exc)[:300]
        finally:
            reader.join(10)
            if reader.is_alive():
                reader.kill()
                reader.join(5)
        runs.append(run)
        print(
            f"  {subscriber} {mode}: {run.delivered}/{run.events} delivered "
            f"({run.gaps} gaps, {run.gap_events} events in gaps), {run.rate:.0f} events/s, "
            f"published at {run.publish_rate:.0f}/s {run.error}",
            flush=True,
        )
    return runs


# --- Phase 3: idle SSE connections -------------------------------------------------------------


class IdleStream(asyncio.Protocol):
    """One SSE connection held open: counts the events that reach it."""

    def __init__(
        self, job_id: str, request: bytes, opened: asyncio.Future[int], tally: dict[str, int]
    ):
        self.job_id = job_id
        self.tally = tally  # "now": streams open (answered 200) at this moment; "peak"
        self.request = request
        self.opened = opened
        self.parser = SSEParser()
        self.events = 0
        self.closed = False
        self.closed_at = 0.0
        self.how = ""
        self.last_data_at = 0.0
        self.event_at = 0.0  # when the last event arrived
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.last_data_at = time.perf_counter()
        for message in self.parser.feed(data):
            if message.event != "gap":
                self.events += 1
                self.event_at = self.last_data_at
        if self.parser.status is not None and not self.opened.done():
            self.opened.set_result(self.parser.status)
            if self.parser.status == 200:
                self.tally["now"] += 1
                self.tally["peak"] = max(self.tally["peak"], self.tally["now"])

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closed_at = time.perf_counter()
        self.how = (
            "response ended by the server"
            if self.parser.ended
            else "connection closed mid-response"
            if exc is None
            else type(exc).__name__
        )
        if self.parser.status == 200:
            self.tally["now"] -= 1
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the answer: {exc!r}"))


@dataclass
class IdleStage:
    label: str
    target: int
    opened: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rss_mb: float = 0.0
    kb_per_conn: float = 0.0
    gateway_cpu_ms_per_conn: float = 0.0


@dataclass
class IdleResult:
    connections: int
    own_jobs: int
    shared_jobs: int
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    rss_closed_mb: float = 0.0
    opened: int = 0
    stopped_because: str = ""
    stages: list[IdleStage] = field(default_factory=list)
    open_seconds: float = 0.0
    idle_window_s: float = 0.0
    idle_cpu_pct: float = 0.0
    keepalives_per_s: float = 0.0
    health_ms: float = 0.0
    probe_targets: int = 0
    probe_reached: int = 0
    probe_wrong: int = 0
    probe_s: float = 0.0
    closed_by_server: int = 0
    closed_when: dict[str, int] = field(default_factory=dict)
    silent: int = 0  # open, but nothing (not even a keep-alive) for 1.5 keep-alive intervals
    keepalive_s: float = KEEPALIVE_S
    keepalives: int = 0
    probe_p50_s: float = 0.0
    probe_p99_s: float = 0.0
    probe_alive_targets: int = 0
    peak_open: int = 0  # streams open at the same moment, at most
    open_at_rss: int = 0  # streams open when rss_after_mb was read
    open_after_idle: int = 0
    channels_open: int = 0
    channels_after_close: int = 0
    client_fds: int = 0
    gateway_fds: int = 0
    # The second round: open ``again`` more streams, close them all at once.
    again: int = 0
    again_opened: int = 0
    rss_again_open_mb: float = 0.0
    rss_again_closed_mb: float = 0.0
    channels_after_again: int = 0

    @property
    def kb_per_conn(self) -> float:
        if not self.opened:
            return 0.0
        return (self.rss_after_mb - self.rss_before_mb) * 1024 / self.opened


async def _open_streams(
    port: int,
    job_ids: list[str],
    concurrency: int,
    streams: list[IdleStream],
    tally: dict[str, int] | None = None,
) -> Counter[str]:
    tally = {"now": 0, "peak": 0} if tally is None else tally
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    failed: Counter[str] = Counter()

    async def one(job_id: str) -> None:
        async with gate:
            opened: asyncio.Future[int] = loop.create_future()
            request = _get(port, f"/api/v1/jobs/{job_id}/events", "text/event-stream")
            try:
                _, stream = await loop.create_connection(
                    lambda: IdleStream(job_id, request, opened, tally), "127.0.0.1", port
                )
                status = await asyncio.wait_for(opened, 60)
            except OSError as exc:
                failed[f"{type(exc).__name__}: {exc.strerror or exc}"[:80]] += 1
                return
            except (ConnectionError, TimeoutError) as exc:
                failed[type(exc).__name__] += 1
                return
            if status != 200:
                failed[f"HTTP {status}"] += 1
                if stream.transport:
                    stream.transport.close()
                return
            streams.append(stream)

    await asyncio.gather(*(one(j) for j in job_ids))
    return failed


async def _health_ms(port: int) -> float:
    conn = await HttpConn.open(port)
    try:
        t = time.perf_counter()
        status, _ = await conn.request(_get(port, "/health"))
        return (time.perf_counter() - t) * 1000 if status == 200 else math.nan
    finally:
        conn.close()


def _count_channels(client: Any) -> int:
    from conveyor import keys

    return len(client.pubsub_channels(keys.events_channel("*")))


async def _idle(ctx: Context) -> IdleResult:
    import psutil

    args = ctx.args
    own = min(args.own_jobs, args.connections)
    result = IdleResult(args.connections, own, args.shared_jobs)
    result.keepalive_s = ctx.keepalive_s()
    own_ids = [str(uuid.uuid4()) for _ in range(own)]
    shared_ids = [str(uuid.uuid4()) for _ in range(args.shared_jobs)]
    ctx.fake_jobs(own_ids + shared_ids)
    targets = own_ids + [shared_ids[i % len(shared_ids)] for i in range(args.connections - own)]
    streams: list[IdleStream] = []
    by_job: dict[str, list[IdleStream]] = {}
    gw = ctx.gateway.pid
    tally = {"now": 0, "peak": 0}
    keepalive_s = ctx.keepalive_s()

    await asyncio.sleep(1.0)
    result.rss_before_mb = rss(gw) / 2**20
    stage_size = max(1, args.stage)
    bounds = [0, own] if own else [0]
    while bounds[-1] < len(targets):
        bounds.append(min(len(targets), bounds[-1] + stage_size))
    t_open = time.perf_counter()
    rss_prev = result.rss_before_mb
    for lo, hi in itertools.pairwise(bounds):
        label = "one job each" if hi <= own else f"shared by {len(shared_ids)} jobs"
        stage = IdleStage(f"{lo}-{hi} ({label})", hi - lo)
        before = len(streams)
        cpu0 = cpu_s(gw)
        t = time.perf_counter()
        failed = await _open_streams(
            ctx.port, targets[lo:hi], args.open_concurrency, streams, tally
        )
        stage.seconds = time.perf_counter() - t
        stage.opened = len(streams) - before
        stage.failed = dict(failed)
        stage.gateway_cpu_ms_per_conn = (cpu_s(gw) - cpu0) * 1000 / max(stage.opened, 1)
        await asyncio.sleep(0.3)
        stage.rss_mb = rss(gw) / 2**20
        stage.kb_per_conn = (stage.rss_mb - rss_prev) * 1024 / max(stage.opened, 1)
        rss_prev = stage.rss_mb
        result.stages.append(stage)
        print(
            f"  {stage.label}: {stage.opened}/{stage.target} open in {stage.seconds:.1f} s, "
            f"gateway RSS {stage.rss_mb:.0f} MB ({stage.kb_per_conn:.1f} KB/conn), "
            f"failed {stage.failed or 0}",
            flush=True,
        )
        if sum(failed.values()) > max(50, (hi - lo) // 10):
            result.stopped_because = f"{sum(failed.values())} failures at {lo}-{hi}: {failed}"
            break
        if time.perf_counter() - t_open > args.open_limit_s and hi < len(targets):
            result.stopped_because = (
                f"opening took more than {args.open_limit_s:g} s (--open-limit-s); stopped at {hi}"
            )
            break
    result.open_seconds = time.perf_counter() - t_open
    result.opened = len(streams)
    for stream in streams:
        by_job.setdefault(stream.job_id, []).append(stream)

    await asyncio.sleep(2.0)
    result.rss_after_mb = rss(gw) / 2**20
    result.open_at_rss = tally["now"]
    with contextlib.suppress(psutil.Error):
        result.gateway_fds = psutil.Process(gw).num_fds()
    result.client_fds = psutil.Process().num_fds()
    result.channels_open = _count_channels(ctx.redis)

    # Idle: the gateway's CPU over a window a little longer than one keep-alive interval.
    window = keepalive_s + 1.0 if not args.quick_idle else 3.0
    t_idle = time.perf_counter()
    cpu0 = cpu_s(gw)
    await asyncio.sleep(window)
    result.idle_window_s = window
    result.idle_cpu_pct = 100 * (cpu_s(gw) - cpu0) / window
    result.health_ms = await _health_ms(ctx.port)

    # The streams still serve: one event to every shared job and to a sample of the own ones.
    now = time.perf_counter()
    result.silent = sum(
        1 for s in streams if not s.closed and now - s.last_data_at > 1.5 * keepalive_s
    )
    result.open_after_idle = tally["now"]
    result.keepalives = sum(s.parser.comments for s in streams)
    sample = own_ids[: args.probe_own] + shared_ids
    expected = {id(s) for j in sample for s in by_job.get(j, [])}
    result.probe_targets = len(expected)
    alive = {id(s) for s in streams if id(s) in expected and not s.closed}
    result.probe_alive_targets = len(alive)
    events_before = {id(s): s.events for s in streams}
    publisher = ctx.event_publisher()
    t_probe = time.perf_counter()
    await asyncio.to_thread(
        lambda: [
            publisher.publish(
                j, type="update", component="maintenance", event="maintenance_progress", data={}
            )
            for j in sample
        ]
    )
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline:
        reached = sum(1 for s in streams if id(s) in alive and s.events > events_before[id(s)])
        if reached >= len(alive):
            break
        await asyncio.sleep(0.01)
    result.probe_s = time.perf_counter() - t_probe
    result.probe_reached = sum(
        1 for s in streams if id(s) in expected and s.events > events_before[id(s)]
    )
    result.probe_wrong = sum(
        1 for s in streams if id(s) not in expected and s.events > events_before[id(s)]
    )
    arrivals = [
        s.event_at - t_probe
        for s in streams
        if id(s) in expected and s.events > events_before[id(s)]
    ]
    result.probe_p50_s, result.probe_p99_s = pct(arrivals, 50), pct(arrivals, 99)
    result.closed_by_server = sum(1 for s in streams if s.closed)
    result.peak_open = tally["peak"]
    when: Counter[str] = Counter()
    for s in streams:
        if s.closed:
            phase = (
                "while opening"
                if s.closed_at < t_idle
                else "while idle"
                if s.closed_at < t_probe
                else "during the probe"
            )
            when[f"{phase}, {s.how}"] += 1
    result.closed_when = dict(when)

    async def close_all(held: list[IdleStream]) -> int:
        """Every client leaves at once; the channels still subscribed once things settle."""
        for stream in held:
            if stream.transport:
                stream.transport.close()
        channels = 0
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.5)
            channels = _count_channels(ctx.redis)
            if channels == 0:
                break
        await asyncio.sleep(1.0)
        return channels

    result.channels_after_close = await close_all(streams)
    result.rss_closed_mb = rss(gw) / 2**20
    print(
        f"  closed: {result.channels_after_close} channels still subscribed, gateway RSS "
        f"{result.rss_closed_mb:.0f} MB",
        flush=True,
    )

    # A second round on the same jobs: with every stream of the first freed, it fits in the
    # memory they left (RSS stays flat); with them leaked, RSS grows by about a round's worth.
    if args.again:
        result.again = min(args.again, len(targets))
        again: list[IdleStream] = []
        await _open_streams(ctx.port, targets[: result.again], args.open_concurrency, again)
        result.again_opened = len(again)
        await asyncio.sleep(1.0)
        result.rss_again_open_mb = rss(gw) / 2**20
        result.channels_after_again = await close_all(again)
        result.rss_again_closed_mb = rss(gw) / 2**20
        print(
            f"  again: {len(again)} opened and closed: RSS {result.rss_again_open_mb:.0f} → "
            f"{result.rss_again_closed_mb:.0f} MB, {result.channels_after_again} channels",
            flush=True,
        )
    return result


def run_idle(ctx: Context) -> IdleResult:
    loop = _new_loop()
    try:
        return loop.run_until_complete(_idle(ctx))
    finally:
        loop.close()


# --- The run's context ---------------------------------------------------------------------------


class Context:
    """The servers, the gateway, the worker and this process's clients."""

    def __init__(self, args: argparse.Namespace, work: Path, processes: Processes):
        self.args = args
        self.work = work
        self.processes = processes
        self.redis_url = ""
        self.redis_pid: int | None = None
        self.port = 0
        self.gateway: Proc = None  # type: ignore[assignment]
        self.worker: Proc = None  # type: ignore[assignment]
        self.redis: Any = None
        self.submitter: Any = None
        self._publisher: Any = None

    def env(self) -> dict[str, str]:
        env = _clean_env()
        env.update(
            REDIS_URL=self.redis_url,
            # Nothing measured here touches Postgres (GET /ready says it is unreachable).
            DATABASE_URL="postgresql://bench@127.0.0.1:9/none",
            CONVEYOR_HOME=str(self.work / "home"),
            CONVEYOR_ENV="dev",
            CONVEYOR_GATEWAY_KEYS="",
            CONVEYOR_GATEWAY_RATE_LIMIT=RATE_LIMIT,
        )
        for setting in self.args.env:
            name, _, value = setting.partition("=")
            env[name] = value
        return env

    def keepalive_s(self) -> float:
        for setting in self.args.env:
            name, _, value = setting.partition("=")
            if name == "CONVEYOR_GATEWAY_KEEPALIVE":
                return float(value)
        return KEEPALIVE_S

    def pids(self, **more: int) -> dict[str, int | None]:
        """The processes of this run to meter: the gateway, this one (the client), Redis."""
        pids: dict[str, int | None] = {"gateway": self.gateway.pid, "client": None}
        if self.redis_pid:
            pids["redis"] = self.redis_pid
        return {**pids, **more}

    def start_gateway(self) -> None:
        from workers.dev.embedded import free_port

        self.port = free_port()
        self.gateway = self.processes.start(
            "gateway",
            [sys.executable, "-m", "workers.cli", "gateway", f"--port={self.port}"],
            self.env(),
        )
        deadline = time.monotonic() + 60
        loop = _new_loop()
        try:
            while True:
                with contextlib.suppress(OSError, ValueError, asyncio.IncompleteReadError):
                    if loop.run_until_complete(_health_ms(self.port)) < math.inf:
                        break
                if self.gateway.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not start:\n{self.gateway.tail()}")
                time.sleep(0.2)
        finally:
            loop.close()

    def start_worker(self) -> None:
        self.worker = self.processes.start(
            "worker-maintenance",
            [
                sys.executable,
                "-m",
                "workers.cli",
                "worker",
                QUEUE,
                "--loglevel=WARNING",
                "--hostname=bench-maintenance@%h",
            ],
            self.env(),
        )
        job = self.submitter.submit(TASK, PAYLOAD)
        deadline = time.monotonic() + 90
        while self.submitter.states([job.id])[0] is None:
            if self.worker.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not run a job:\n{self.worker.tail()}")
            time.sleep(0.2)

    def queue_keys(self) -> list[str]:
        from conveyor.config import broker_transport_options
        from workers import settings
        from workers.observability.queues import queue_keys

        options = broker_transport_options(settings.core().visibility_timeout_s)
        return queue_keys(QUEUE, options["priority_steps"], options["sep"])

    def outstanding(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for key in self.queue_keys():
            pipe.llen(key)
        pipe.hlen("unacked")
        return sum(pipe.execute())

    def purge_queue(self) -> None:
        self.redis.delete(*self.queue_keys())

    def wait_queue_empty(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.outstanding() and time.monotonic() < deadline:
            time.sleep(0.1)

    def worker_drain_rate(self) -> float:
        """Jobs/s the worker takes from a pre-loaded queue (first start to last start)."""
        n = self.args.drain_jobs
        self.wait_queue_empty(60)
        jobs = self.submitter.submit_many(TASK, [PAYLOAD] * n)
        starts = sorted(start_times(self.redis, [j.id for j in jobs], timeout_s=120).values())
        if len(starts) < 2:
            return 0.0
        return (len(starts) - 1) / max(starts[-1] - starts[0], 1e-9)

    def fake_jobs(self, job_ids: list[str]) -> None:
        """Indexed jobs of no tenant whose events this run publishes itself."""
        from conveyor import jobindex

        for start in range(0, len(job_ids), 1000):
            pipe = self.redis.pipeline()
            jobindex.record(pipe, TASK, job_ids[start : start + 1000], None, ttl_s=3600)
            pipe.execute()

    def event_publisher(self) -> Any:
        from workers.runtime.events import EventPublisher

        if self._publisher is None:
            self._publisher = EventPublisher(self.redis, stream_maxlen=1000, ttl_s=600)
        return self._publisher


@contextlib.contextmanager
def _redis(args: argparse.Namespace, work: Path) -> Iterator[tuple[str, int | None]]:
    import redis

    if args.redis_url:
        redis.Redis.from_url(args.redis_url).flushdb()
        yield args.redis_url, None
        return
    from workers.dev.embedded import EmbeddedRedis

    server = EmbeddedRedis(work / "valkey", persist=False)
    server.start()
    try:
        yield server.url, server.pid
    finally:
        server.stop()


# --- The report ----------------------------------------------------------------------------------


def machine(redis_client: Any) -> dict[str, Any]:
    import psutil

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = {}
    for name in (
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "redis",
        "celery",
        "kombu",
        "pydantic",
        "psutil",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    server = ""
    with contextlib.suppress(Exception):
        info = redis_client.info("server")
        server = (
            f"valkey {info['valkey_version']}"
            if "valkey_version" in info
            else f"redis {info.get('redis_version')}"
        )
    import resource

    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "server": server,
        "packages": packages,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def code_version() -> str:
    """The commit measured, and the files of the gateway's code changed since (uncommitted)."""

    def git(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
            return done.stdout
        return ""

    head = git("log", "-1", "--format=%h %ad", "--date=format:%Y-%m-%d %H:%M").strip()
    changed = [
        line[3:]
        for line in git("status", "--porcelain", "--", "workers", "conveyor").splitlines()
        if line[:2].strip()
    ]
    if not head:
        return "unknown (not a git checkout)"
    if not changed:
        return f"commit {head}, no uncommitted changes in workers/ or conveyor/"
    digest = git("diff", "HEAD", "--", "workers", "conveyor")
    import hashlib

    fingerprint = hashlib.sha256(digest.encode()).hexdigest()[:10]
    return (
        f"commit {head} plus uncommitted changes to {', '.join(changed)} "
        f"(diff sha256 {fingerprint})"
    )


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        out.append(
            "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        )
    return out


def _f(value: float, digits: int = 1) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


@dataclass
class Report:
    command: str
    started: str
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    submits: list[SubmitRun] = field(default_factory=list)
    drain_rate: float = 0.0
    latency: list[LatencyRun] = field(default_factory=list)
    events: list[EventsRun] = field(default_factory=list)
    idle: IdleResult | None = None
    gateway_log: dict[str, int] = field(default_factory=dict)
    worker_log: dict[str, int] = field(default_factory=dict)
    gateway_exceptions: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    code: str = ""

    def lines(self) -> list[str]:
        m = self.machine
        out = [
            "# Gateway benchmark",
            "",
            f"Command: `{self.command}` — {self.started}, took {self.seconds:.0f} s.",
            "",
            f"Code measured: {self.code}.",
            "",
            f"Machine: {m.get('cores')} cores ({m.get('cpu')}), {m.get('memory_gb')} GB, Linux "
            f"{m.get('kernel')}, Python {m.get('python')}, {m.get('server')}, ulimit -n "
            f"{m.get('nofile')}; "
            + ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())
            + f". Load average {self.load_before} before, {self.load_after} after.",
            "",
            "One `conveyor gateway` process (uvicorn, dev mode without keys, rate limit "
            f"{RATE_LIMIT}), one `conveyor worker maintenance` (as configured, "
            "`--loglevel=WARNING`) for the latency rows only, an embedded Valkey, and this "
            "process as the client, all on the same cores. Settings: "
            + ", ".join(f"{k}={v}" for k, v in self.config.items())
            + ".",
        ]
        if self.submits:
            out += [
                "",
                "## 1. Submits (`maintenance.ping`, closed loop, no worker running)",
                "",
                *_table(
                    [
                        "submitter",
                        "submits/s",
                        "answer p50/p99 ms",
                        "outcomes",
                        "gateway CPU ms/submit (event loop)",
                        "client CPU ms/submit",
                        "redis CPU ms/submit",
                        "machine busy (others)",
                    ],
                    [
                        [
                            r.system,
                            _f(r.rate, 0),
                            f"{_f(r.answer_p50_ms)}/{_f(r.answer_p99_ms)}",
                            ", ".join(f"{k}: {v}" for k, v in r.statuses.items()),
                            f"{r.cpu_ms.get('gateway', 0):.2f} (loop {r.loop_cpu_ms:.2f})"
                            if "gateway" in r.system
                            else "—",
                            _f(r.cpu_ms.get("client", 0), 2),
                            _f(r.cpu_ms.get("redis", math.nan), 2),
                            f"{r.machine_pct:.0f} % ({r.others_pct:.0f} %)",
                        ]
                        for r in self.submits
                    ],
                ),
            ]
            gw = [r for r in self.submits if r.system.startswith("gateway")]
            lib = [r for r in self.submits if r.system.startswith("library")]
            if gw and lib:
                out += [
                    "",
                    "gateway / library submits/s: "
                    + ", ".join(f"{gw[0].rate / r.rate:.2f}x vs {r.system}" for r in lib if r.rate)
                    + ". Client CPU for the gateway rows is the HTTP client's; for the library "
                    "rows it is `Submitter.submit` itself.",
                ]
        if self.latency:
            out += [
                "",
                "## 1b. Latency from submit to the job's start, open loop (worker running)",
                "",
                f"The worker alone drains {self.drain_rate:.0f} jobs/s from a pre-loaded queue "
                f"({self.config.get('drain_jobs')} jobs). Start = the `timestamp` of the job's "
                "`maintenance_start` event (worker's clock, ms, floored); the time origin is the "
                "moment the POST was written / `submit()` was called. Answer = until the 202 / "
                "`submit()` returned.",
                "",
                *_table(
                    [
                        "submitter",
                        "offered/s",
                        "achieved/s",
                        "started/sent",
                        "start p50 ms",
                        "p90",
                        "p99",
                        "max",
                        "answer p50/p99 ms",
                        "late sends",
                        "gateway CPU",
                        "worker CPU",
                        "machine busy (others)",
                        "errors",
                    ],
                    [
                        [
                            r.system,
                            f"{r.rate:g}",
                            _f(r.achieved_rate, 0),
                            f"{r.started}/{r.sent}",
                            _f(r.start_p50_ms),
                            _f(r.start_p90_ms),
                            _f(r.start_p99_ms),
                            _f(r.start_max_ms),
                            f"{_f(r.answer_p50_ms)}/{_f(r.answer_p99_ms)}",
                            str(r.late_sends),
                            f"{r.gateway_cpu_pct:.0f} %",
                            f"{r.worker_cpu_pct:.0f} %",
                            f"{r.machine_pct:.0f} % ({r.others_pct:.0f} %)",
                            json.dumps(r.errors) if r.errors else "0",
                        ]
                        for r in self.latency
                    ],
                ),
            ]
        if self.events:
            out += [
                "",
                "## 2. Events/s one subscriber follows (one job, `EventPublisher`)",
                "",
                f"`paced`: at most {self.config.get('window')} events published ahead of what "
                f"the subscriber got (the gateway buffers {CLIENT_BUFFER} per client); "
                "`burst`: published as fast as Redis takes them. events/s = delivered events "
                "÷ (last received - first published).",
                "",
                *_table(
                    [
                        "subscriber",
                        "mode",
                        "delivered/published",
                        "gaps (events in them)",
                        "in order",
                        "stream ended",
                        "events/s end to end",
                        "publisher events/s",
                        "gateway CPU µs/event",
                        "error",
                    ],
                    [
                        [
                            r.subscriber,
                            r.mode,
                            f"{r.delivered}/{r.events}",
                            f"{r.gaps} ({r.gap_events})",
                            "yes" if r.in_order else "NO",
                            "yes" if r.server_closed else "NO (open 5 s after the last seq)",
                            _f(r.rate, 0),
                            _f(r.publish_rate, 0),
                            _f(r.gateway_cpu_us_per_event, 0)
                            if r.subscriber.startswith("gateway")
                            else "—",
                            r.error or "",
                        ]
                        for r in self.events
                    ],
                ),
            ]
            by = {(r.subscriber, r.mode): r for r in self.events}
            for mode in ("paced", "burst"):
                a, b = by.get(("gateway SSE", mode)), by.get(("redis pub/sub", mode))
                if a and b and b.rate:
                    out.append(f"\n{mode}: gateway SSE / plain pub/sub = {a.rate / b.rate:.2f}x")
        if self.idle:
            i = self.idle
            reached = "yes" if i.peak_open >= 10_000 else "NO"
            out += [
                "",
                "## 3. Idle SSE connections one gateway process holds",
                "",
                *_table(
                    [
                        "stage",
                        "opened",
                        "seconds",
                        "conn/s",
                        "gateway RSS MB",
                        "KB/conn",
                        "gateway CPU ms/conn",
                        "failed",
                    ],
                    [
                        [
                            s.label,
                            f"{s.opened}/{s.target}",
                            _f(s.seconds),
                            _f(s.opened / s.seconds if s.seconds else 0, 0),
                            _f(s.rss_mb, 0),
                            _f(s.kb_per_conn),
                            _f(s.gateway_cpu_ms_per_conn, 2),
                            json.dumps(s.failed) if s.failed else "0",
                        ]
                        for s in i.stages
                    ],
                ),
                "",
                *_table(
                    ["figure", "value"],
                    [
                        [
                            "streams open at the same moment, at most",
                            f"{i.peak_open} of {i.connections} (≥ 10,000: {reached}); "
                            f"{i.opened} were answered 200 in all",
                        ],
                        [
                            "still open after the idle window",
                            f"{i.open_after_idle}",
                        ],
                        [
                            "jobs",
                            f"{i.own_jobs} with one connection each, "
                            f"{i.shared_jobs} shared by the rest",
                        ],
                        [
                            "gateway RSS before → with all open",
                            f"{i.rss_before_mb:.0f} → {i.rss_after_mb:.0f} MB",
                        ],
                        [
                            "RSS per connection ((with all open - before) ÷ answered 200)",
                            f"{i.kb_per_conn:.1f} KB ({i.open_at_rss} of them still open "
                            "when RSS was read)",
                        ],
                        ["gateway fds / client fds", f"{i.gateway_fds} / {i.client_fds}"],
                        [
                            "pub/sub channels subscribed (open → after close)",
                            f"{i.channels_open} → {i.channels_after_close}",
                        ],
                        [
                            f"gateway CPU while idle ({i.idle_window_s:.0f} s window)",
                            f"{i.idle_cpu_pct:.1f} % of a core",
                        ],
                        ["GET /health while holding them", f"{_f(i.health_ms)} ms"],
                        [
                            "probe: one event to every shared job + sample",
                            f"{i.probe_reached}/{i.probe_targets} connections "
                            f"({i.probe_alive_targets} still open) got it, p50 "
                            f"{_f(i.probe_p50_s, 2)} s, p99 {_f(i.probe_p99_s, 2)} s, all in "
                            f"{i.probe_s:.2f} s; {i.probe_wrong} others got one",
                        ],
                        [
                            "closed by the server meanwhile",
                            f"{i.closed_by_server} {json.dumps(i.closed_when)}"
                            if i.closed_by_server
                            else "0",
                        ],
                        [
                            f"open but silent > {1.5 * i.keepalive_s:.0f} s "
                            "(no event, no keep-alive)",
                            f"{i.silent}; keep-alives received in all: {i.keepalives}",
                        ],
                        ["gateway RSS after closing them all", f"{i.rss_closed_mb:.0f} MB"],
                        [
                            f"again: {i.again_opened} more opened, then closed at once",
                            f"RSS {i.rss_closed_mb:.0f} → {i.rss_again_open_mb:.0f} → "
                            f"{i.rss_again_closed_mb:.0f} MB; {i.channels_after_again} channels "
                            "still subscribed",
                        ],
                        ["stopped early", i.stopped_because or "no"],
                    ],
                ),
            ]
        out += [
            "",
            f"Logs: gateway {self.gateway_log}, worker {self.worker_log} (lines with WARNING / "
            "ERROR / Traceback).",
        ]
        if self.gateway_exceptions:
            out += ["", "The gateway's log reports (exception, in our code, times):", ""]
            out += [f"- `{k}`: {v}" for k, v in self.gateway_exceptions.items()]
        if self.notes:
            out += ["", "## Notes", "", *[f"- {n}" for n in self.notes]]
        return out


# --- Main ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.gateway", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--phases", default="submit,latency,events,idle", help="which, comma-separated")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    p.add_argument("--submit-seconds", type=float, default=6.0, help="per closed-loop row (6)")
    p.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[25.0, 100.0, 200.0],
        help="offered loads, submits/s (25,100,200)",
    )
    p.add_argument("--rate-seconds", type=float, default=5.0, help="per open-loop row (5)")
    p.add_argument("--drain-jobs", type=int, default=300, help="jobs for the worker's drain")
    p.add_argument("--events", type=int, default=20_000, help="events per events row (20000)")
    p.add_argument("--window", type=int, default=500, help="paced: events ahead at most (500)")
    p.add_argument("--connections", type=int, default=10_000, help="idle SSE connections")
    p.add_argument("--own-jobs", type=int, default=1000, help="connections with a job each")
    p.add_argument("--shared-jobs", type=int, default=10, help="jobs the others share")
    p.add_argument("--stage", type=int, default=3000, help="connections per measured stage")
    p.add_argument("--open-concurrency", type=int, default=200, help="openings at once (200)")
    p.add_argument("--probe-own", type=int, default=100, help="own-job connections probed")
    p.add_argument(
        "--again", type=int, default=2000, help="streams of the second round (2000; 0: none)"
    )
    p.add_argument(
        "--open-limit-s", type=float, default=90.0, help="stop opening streams after (90 s)"
    )
    p.add_argument("--quick-idle", action="store_true", help="a 3 s idle window, not 16 s")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the gateway and the worker (repeatable)",
    )
    p.add_argument("--redis-url", help="a Redis to use (its DB is flushed) instead of Valkey")
    p.add_argument("--out", default=str(RESULTS), help="the Markdown results file ('' for none)")
    p.add_argument("--keep-logs", action="store_true")
    return p


def _notes(report: Report) -> list[str]:
    notes = []
    for r in report.submits:
        bad = {k: v for k, v in r.statuses.items() if k not in ("202", "ok")}
        if bad:
            notes.append(f"{r.system}: non-202 outcomes {bad}")
    for lr in report.latency:
        if lr.errors:
            notes.append(f"latency {lr.system} @ {lr.rate:g}/s: errors {lr.errors}")
        if lr.started < lr.ok:
            notes.append(
                f"latency {lr.system} @ {lr.rate:g}/s: {lr.ok - lr.started} jobs never started"
            )
        if report.drain_rate and lr.rate > 0.9 * report.drain_rate and lr.system == "library":
            notes.append(
                f"{lr.rate:g}/s offered is at or above what the worker drains "
                f"({report.drain_rate:.0f}/s): those rows measure its queue as much as the submit"
            )
    for er in report.events:
        if er.error:
            notes.append(f"events {er.subscriber} {er.mode}: {er.error}")
        if not er.error and not er.server_closed:
            notes.append(
                f"events {er.subscriber} {er.mode}: the stream did not end although seq "
                f"{er.events}, the terminal event, was passed (inside a gap marker): an SSE "
                "client waits for an end that never comes (keep-alives only)"
            )
        if not er.error and er.gaps:
            notes.append(
                f"events {er.subscriber} {er.mode}: {er.gap_events} of {er.events} events "
                f"reached the SSE client only as {er.gaps} gap marker(s), though the job's stream "
                "still held them (the per-client buffer overflowed)"
            )
    i = report.idle
    if i:
        if i.peak_open < i.connections:
            notes.append(
                f"idle: at most {i.peak_open} of {i.connections} streams were open at the same "
                f"moment ({i.opened} were answered 200, {i.closed_by_server} of them closed by "
                f"the server: {i.closed_when})"
                + (f"; {i.stopped_because}" if i.stopped_because else "")
            )
        if i.probe_reached < i.probe_alive_targets or i.probe_wrong:
            notes.append(
                f"idle probe: {i.probe_reached} of the {i.probe_alive_targets} open targets got "
                f"the event within 10 s; {i.probe_wrong} connections got one not meant for them"
            )
        if i.closed_by_server:
            notes.append(
                f"idle: the gateway closed {i.closed_by_server} idle streams itself "
                f"({i.closed_when}); see the exceptions its log reports"
            )
        if i.again_opened and i.rss_again_closed_mb > i.rss_closed_mb + 0.5 * (
            i.again_opened * i.kb_per_conn / 1024
        ):
            grown = i.rss_again_closed_mb - i.rss_closed_mb
            notes.append(
                f"idle: the second round grew the gateway by {grown:.0f} MB "
                f"({grown * 1024 / i.again_opened:.1f} KB per stream) though every stream of the "
                "first round had been closed: their memory was not freed"
            )
        if i.channels_after_close:
            notes.append(
                f"idle: {i.channels_after_close} pub/sub channels still subscribed "
                "10 s after every client left"
            )
    for name, counts in (("gateway", report.gateway_log), ("worker", report.worker_log)):
        if counts.get("ERROR") or counts.get("Traceback"):
            notes.append(
                f"the {name}'s log has {counts} (kept in the work folder with --keep-logs)"
            )
    return notes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = " ".join(
        [".venv/bin/python", "-m", "bench.gateway", *(sys.argv[1:] if argv is None else argv)]
    )
    report = Report(command=command, started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    report.config = {
        k: getattr(args, k)
        for k in (
            "concurrency",
            "submit_seconds",
            "rates",
            "rate_seconds",
            "drain_jobs",
            "events",
            "window",
            "connections",
            "own_jobs",
            "shared_jobs",
            "open_concurrency",
            "again",
            "open_limit_s",
        )
    }
    if args.env:
        report.config["env"] = args.env
    report.load_before = [round(x, 2) for x in os.getloadavg()]
    report.code = code_version()
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-gateway-"))
    processes = Processes(work)
    ctx = Context(args, work, processes)
    try:
        with _redis(args, work) as (redis_url, redis_pid):
            import redis

            ctx.redis_url, ctx.redis_pid = redis_url, redis_pid
            os.environ["REDIS_URL"] = redis_url  # the library's Submitter reads it
            from conveyor import Submitter

            ctx.redis = redis.Redis.from_url(redis_url)
            ctx.submitter = Submitter()
            report.machine = machine(ctx.redis)
            ctx.start_gateway()
            print(
                f"gateway on port {ctx.port} (pid {ctx.gateway.pid}); work folder {work}",
                flush=True,
            )
            if "submit" in phases:
                print("1. submits, closed loop …", flush=True)
                report.submits = run_submits(ctx)
            if "latency" in phases:
                print("1b. latency to the start event, open loop …", flush=True)
                ctx.purge_queue()
                ctx.start_worker()
                report.drain_rate, report.latency = run_latency(ctx)
                report.worker_log = ctx.worker.log_counts()
                processes.stop([ctx.worker])
            if "events" in phases:
                print("2. events/s one subscriber follows …", flush=True)
                report.events = run_events(ctx)
            if "idle" in phases:
                print(f"3. {args.connections} idle SSE connections …", flush=True)
                report.idle = run_idle(ctx)
            report.gateway_log = ctx.gateway.log_counts()
            report.gateway_exceptions = ctx.gateway.exceptions()
            ctx.submitter.close()
            processes.stop()
    finally:
        processes.stop()
        if args.keep_logs:
            print(f"logs: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.perf_counter() - t_start
    report.load_after = [round(x, 2) for x in os.getloadavg()]
    report.notes = _notes(report)
    text = "\n".join(report.lines()) + "\n"
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
