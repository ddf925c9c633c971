"""How many slow generations one ``ai`` worker host keeps in flight, and what each costs.

    .venv/bin/python -m bench.ai_inflight [--jobs 5000 --concurrency 500 --stream-seconds 5]

Issue 3's benchmark. An upstream that streams every answer over ``--stream-seconds`` (a lean
asyncio server of this module, in its own process, speaking OpenAI's SSE wire format: a
``chat.completion.chunk`` per token, a usage chunk, ``data: [DONE]``) is called by

1. **Conveyor's ai pool**: ``--processes`` x ``conveyor worker ai`` (threads pool,
   ``CONVEYOR_AI_CONCURRENCY`` = concurrency ÷ processes), ``ai.chat`` jobs submitted with
   ``Submitter.submit_many``, progress events on (``CONVEYOR_AI_PROGRESS_INTERVAL``, 0.1 s by
   default);
2. **the baseline**: a plain Celery app (defaults: prefork pool, ``-c`` = 2 x cores) whose one
   task makes the same streaming call with ``requests``,

in the same run, against the same upstream and Redis (an embedded Valkey by default). A job
counts when its result is SUCCESS (for Conveyor: a success envelope).

Figures, per system: the completion rate in the steady state (between the ``C``-th and the
``(N-C)``-th completion, so neither the ramp nor the tail counts) against the limit
concurrency ÷ stream time; the streams the upstream saw open at once (peak, and mean over the
steady window); memory per in-flight job, (peak - idle RSS of the worker processes) ÷ peak
in flight, where idle is after a short warm-up; resident memory per slot (PSS at peak ÷ slots),
which is what a prefork slot really costs; and CPU time of the worker processes per completed
job (user + system, from /proc via psutil: it moves far less with what else runs than
wall-clock rates do, though it grows when the workers are starved of CPU). The machine's load
is printed with the figures; ratios between the two systems measured in the same run are the
figures to compare.

Every process it starts runs in its own process group and is stopped at the end (also on
Ctrl-C, SIGTERM or an error); every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
#: The model name that makes the upstream answer at once (warm-up jobs).
WARMUP_MODEL = "bench-warmup"
WARMUP_SECONDS = 0.2
MODEL = "bench-model"
#: Environment variable giving the baseline worker its broker and result backend.
BASELINE_URL_ENV = "BENCH_BASELINE_REDIS_URL"
BASELINE_TASK = "bench.baseline_stream"
BASELINE_QUEUE = "bench_baseline"
#: Seconds between two samples of memory and of the streams open at the upstream.
SAMPLE_S = 0.25
#: Samples between two readings of PSS (smaps), which cost far more than RSS (statm).
PSS_EVERY = 8
#: Seconds between two polls of the results.
POLL_S = 0.5
#: Seconds the warmed-up workers are watched idle, for their memory and idle CPU.
IDLE_S = 2.0
#: Issue 3's target: generations in flight at once, and % of concurrency / stream time.
TARGET_IN_FLIGHT, TARGET_PCT = 500, 90.0
#: Redis DB numbers of the two systems (in the embedded server, or the one given).
CONVEYOR_DB, BASELINE_DB = 1, 2

# --- The baseline: plain Celery, defaults, one task doing the same streaming call --------------

baseline_app = Celery(
    "bench_baseline",
    broker=os.environ.get(BASELINE_URL_ENV, "redis://127.0.0.1:6379/15"),
    backend=os.environ.get(BASELINE_URL_ENV, "redis://127.0.0.1:6379/15"),
)
baseline_app.conf.task_default_queue = BASELINE_QUEUE
_session: requests.Session | None = None


@baseline_app.task(name=BASELINE_TASK)
def baseline_stream(url: str, model: str, prompt: str) -> dict[str, Any]:
    """One streamed chat completion, read line by line as it comes; the text and usage."""
    global _session
    if _session is None:
        _session = requests.Session()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parts: list[str] = []
    usage = None
    with _session.post(url, json=body, stream=True, timeout=(5, 60)) as response:
        response.raise_for_status()
        for line in response.iter_lines(chunk_size=None):  # None: each chunk as it arrives
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                parts.append((choice.get("delta") or {}).get("content") or "")
    return {"content": "".join(parts), "usage": usage}


# --- The upstream: an OpenAI-compatible server that takes its time ------------------------------

_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
#: Seconds between two wake-ups of the upstream's timer loop while it streams.
TICK_S = 0.005
_WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog.")


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _frames(chunks: int, include_usage: bool) -> list[bytes]:
    """The body of one answer as HTTP chunks: the role chunk, ``chunks`` content chunks, then
    the finish chunk, the usage chunk (when asked for), ``[DONE]`` and the end of the body."""
    head = {"id": "chatcmpl-bench", "created": int(time.time()), "model": MODEL}

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        payload: dict[str, Any] = {
            **head,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    frames = [_http_chunk(chunk({"role": "assistant", "content": ""}, None))]
    frames += [
        _http_chunk(chunk({"content": _WORDS[i % len(_WORDS)]}, None)) for i in range(chunks)
    ]
    last = chunk({}, "stop")
    if include_usage:
        usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        last += _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    frames.append(_http_chunk(last + b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return frames


class Upstream:
    """Streams every answer over ``seconds`` (``WARMUP_SECONDS`` for the warm-up model).

    One timer loop writes every stream's due chunks (a heap of due times), which costs far less
    than a sleeping coroutine per stream. ``GET /stats`` tells how many streams are open.
    """

    def __init__(self, seconds: float, chunks: int):
        self.seconds = seconds
        self.chunks = chunks
        self.frames = {usage: _frames(chunks, usage) for usage in (True, False)}
        self.active = 0
        self.peak = 0
        self.served = 0
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._order = itertools.count()
        self._busy: asyncio.Event | None = None  # set while streams are open

    async def serve(self, port: int) -> None:
        self._busy = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", port, backlog=4096)
        ticker = asyncio.create_task(self._tick())
        async with server:
            await server.serve_forever()
        ticker.cancel()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._heap
        while True:
            now = loop.time()
            while heap and heap[0][0] <= now:
                _, _, stream = heapq.heappop(heap)
                transport, frames, index, start, interval, done = stream
                if transport.is_closing():
                    done.set_result(False)
                    continue
                transport.write(frames[index])
                index += 1
                if index == len(frames):
                    done.set_result(True)
                    continue
                stream[2] = index
                due = start + min(index, len(frames) - 2) * interval
                heapq.heappush(heap, (due, next(self._order), stream))
            if not heap:
                self._busy.clear()
                await self._busy.wait()
                continue
            # Every frame due within TICK_S goes out in one wake-up; with few streams, sleep
            # until the next one is due (a new stream's first frame may wait up to 50 ms).
            await asyncio.sleep(min(max(heap[0][0] - loop.time(), TICK_S), 0.05))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                length = 0
                for line in header_lines:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if method == "GET" and path.startswith("/stats"):
                    self._json(writer, self._stats(reset="reset" in path))
                    continue
                if method != "POST" or not path.endswith("/chat/completions"):
                    self._json(writer, {"error": {"message": "not found"}}, status=b"404 Not Found")
                    continue
                request = json.loads(body)
                seconds = WARMUP_SECONDS if request.get("model") == WARMUP_MODEL else self.seconds
                usage = bool((request.get("stream_options") or {}).get("include_usage"))
                frames = self.frames[usage]
                writer.write(_HEAD + frames[0])
                done = loop.create_future()
                start = loop.time()
                interval = seconds / self.chunks
                stream = [writer.transport, frames, 1, start, interval, done]
                heapq.heappush(self._heap, (start + interval, next(self._order), stream))
                self._busy.set()
                self.active += 1
                self.peak = max(self.peak, self.active)
                try:
                    completed = await done
                finally:
                    self.active -= 1
                self.served += 1
                if not completed:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def _stats(self, *, reset: bool) -> dict[str, int]:
        stats = {"active": self.active, "peak": self.peak, "served": self.served}
        if reset:
            self.peak = self.active
        return stats

    @staticmethod
    def _json(writer: asyncio.StreamWriter, payload: Any, status: bytes = b"200 OK") -> None:
        body = json.dumps(payload).encode()
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )


def serve_upstream(port: int, seconds: float, chunks: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Upstream(seconds, chunks).serve(port))


class UpstreamStats:
    """Reads the upstream's ``/stats`` over one kept-alive connection."""

    def __init__(self, port: int):
        self._port = port
        self._conn: http.client.HTTPConnection | None = None

    def get(self, *, reset: bool = False) -> dict[str, int]:
        for attempt in (1, 2):
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=5)
                self._conn.request("GET", "/stats?reset=1" if reset else "/stats")
                return json.loads(self._conn.getresponse().read())
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- Processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


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
                start_new_session=True,  # its own process group: stopped with its children
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[Proc] | None = None, timeout_s: float = 15.0) -> None:
        """SIGTERM each group, wait up to ``timeout_s``, then SIGKILL what is left."""
        targets = list(self.procs if procs is None else procs)
        for proc in targets:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in targets:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)  # stragglers of the group, if any
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
            if proc in self.procs:
                self.procs.remove(proc)


def log_tail(proc: Proc, lines: int = 15) -> str:
    try:
        text = proc.log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def log_warnings(procs: list[Proc]) -> dict[str, int]:
    """Counts of WARNING / ERROR lines in the workers' logs (a busy log costs CPU too)."""
    counts = {"WARNING": 0, "ERROR": 0}
    for proc in procs:
        with contextlib.suppress(OSError), open(proc.log, errors="replace") as f:
            for line in f:
                for level in counts:
                    if level in line:
                        counts[level] += 1
    return counts


# --- Measuring ---------------------------------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes, their live descendants and reaped ones."""
    import psutil

    user = system = 0.0
    for pid in pids:
        for n, proc in enumerate(_tree(pid)):
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            user += t.user + (t.children_user if n == 0 else 0.0)
            system += t.system + (t.children_system if n == 0 else 0.0)
    return user, system


def cpu_s(pids: list[int]) -> float:
    return sum(cpu_times(pids))


def cpu_ns(pids: list[int]) -> int:
    """CPU nanoseconds the live threads of these processes ran (``/proc/*/task/*/schedstat``):
    finer than ``cpu_times``' 10 ms ticks, for the short idle window (Linux only; 0 elsewhere)."""
    total = 0
    for pid in pids:
        for proc in _tree(pid):
            for stat in Path(f"/proc/{proc.pid}/task").glob("*/schedstat"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int(stat.read_text().split()[0])
    return total


def memory(pids: list[int], *, pss: bool = True) -> tuple[int, int]:
    """(RSS, PSS) in bytes of these processes and their descendants."""
    import psutil

    rss = pss_total = 0
    for pid in pids:
        for proc in _tree(pid):
            try:
                if pss:
                    info = proc.memory_full_info()
                    rss += info.rss
                    pss_total += info.pss
                else:
                    rss += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
    return rss, pss_total


@dataclass
class Sample:
    t: float
    rss: int
    pss: int
    active: int


class Sampler(threading.Thread):
    """Every ``SAMPLE_S``: resident memory of the worker processes and the streams open at the
    upstream; every ``PSS_EVERY``-th sample also their PSS (reading smaps costs this process
    far more, and its CPU is taken from the machine being measured)."""

    def __init__(self, pids: list[int], upstream: UpstreamStats):
        super().__init__(daemon=True)
        self.procs = [proc for pid in pids for proc in _tree(pid)]  # found once
        self.upstream = upstream
        self.samples: list[Sample] = []
        self._halt = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        import psutil

        pss = 0
        for n in itertools.count():
            if self._halt.is_set():
                return
            full = n % PSS_EVERY == 0
            try:
                rss = pss_now = 0
                for proc in self.procs:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        info = proc.memory_full_info() if full else proc.memory_info()
                        rss += info.rss
                        pss_now += getattr(info, "pss", 0)
                pss = pss_now if full else pss
                active = self.upstream.get()["active"]
                self.samples.append(Sample(time.time(), rss, pss, active))
            except Exception as exc:  # a sample missed is not worth stopping a run for
                self.error = repr(exc)
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _done_at(meta: dict[str, Any]) -> float:
    raw = meta.get("date_done")
    if not raw:
        return time.time()
    when = datetime.fromisoformat(raw)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass
class Outcome:
    done: dict[str, float] = field(default_factory=dict)  # job id -> completion time
    failed: dict[str, str] = field(default_factory=dict)  # job id -> why

    @property
    def finished(self) -> int:
        return len(self.done) + len(self.failed)


def wait_for_results(
    client: Any,
    ids: list[str],
    *,
    succeeded: Callable[[dict[str, Any]], bool],
    timeout_s: float,
    window: int = 1000,
) -> Outcome:
    """Polls the result backend (``celery-task-meta-<id>``) until every job ended or the time
    is up. Completion times are the workers' ``date_done``, not the poll's, so polling can be
    lazy: each poll reads only the ``window`` oldest unfinished jobs (a queue runs them
    roughly in order), keeping this process's own CPU off the machine it measures."""
    outcome = Outcome()
    pending = list(ids)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        batch, rest = pending[:window], pending[window:]
        still: list[str] = []
        values = client.mget([f"celery-task-meta-{i}" for i in batch])
        for job_id, raw in zip(batch, values, strict=True):
            if raw is None or (b'"SUCCESS"' not in raw and b'"FAILURE"' not in raw):
                still.append(job_id)
                continue
            meta = json.loads(raw)
            if meta.get("status") == "SUCCESS" and succeeded(meta):
                outcome.done[job_id] = _done_at(meta)
            elif meta.get("status") in ("SUCCESS", "FAILURE"):
                outcome.failed[job_id] = str(meta.get("result"))[:300]
            else:
                still.append(job_id)
        pending = still + rest
        if pending and (still or len(batch) < window):
            time.sleep(POLL_S)  # unless the whole window had finished: read on at once
    return outcome


def steady_rate(times: list[float], slots: int, started: float) -> tuple[float, float, float]:
    """(jobs/s, window start, window end) between the ``slots``-th and the
    ``(n - slots)``-th completion: the ramp (the first answers) and the tail (the last, once
    the queue is empty) are left out. Too few jobs for that: all of them since ``started``."""
    times = sorted(times)
    n = len(times)
    if n < 2 * slots + 2:
        if not n:
            return 0.0, started, started
        return n / max(times[-1] - started, 1e-9), started, times[-1]
    start, end = times[slots], times[n - slots]
    return (n - 2 * slots) / max(end - start, 1e-9), start, end


@dataclass
class Phase:
    """What one system did; the figures the report prints."""

    system: str
    layout: str
    slots: int
    jobs: int
    completed: int = 0
    failed: int = 0
    first_error: str = ""
    rate: float = 0.0
    limit: float = 0.0
    peak_in_flight: int = 0
    mean_in_flight: float = 0.0
    rss_idle_mb: float = 0.0
    rss_peak_mb: float = 0.0
    pss_peak_mb: float = 0.0
    kb_per_in_flight: float = 0.0
    mb_pss_per_slot: float = 0.0
    cpu_ms_per_job: float = 0.0  # gross: all the workers' CPU while the jobs ran
    cpu_ms_per_job_net: float = 0.0  # less what the idle workers would have spent meanwhile
    cpu_system_pct: float = 0.0  # share of it in the kernel
    idle_cpu_pct: float = 0.0  # of one core, the idle workers
    upstream_cpu_ms_per_job: float = 0.0
    redis_cpu_ms_per_job: float = 0.0
    driver_cpu_ms_per_job: float = 0.0  # this process: submitting, polling, sampling
    wall_s: float = 0.0
    machine_busy_pct: float = 0.0
    others_busy_pct: float = 0.0
    log_warnings: int = 0
    log_errors: int = 0

    @property
    def pct_of_limit(self) -> float:
        return 100.0 * self.rate / self.limit if self.limit else 0.0


# --- Running one system ------------------------------------------------------------------------


@dataclass
class Setup:
    redis_url_base: str  # without the DB number
    upstream_port: int
    upstream_pid: int
    redis_pid: int | None
    processes: Processes
    upstream: UpstreamStats
    args: argparse.Namespace


def _machine_busy() -> tuple[float, float]:
    import psutil

    t = psutil.cpu_times()
    return t.idle + getattr(t, "iowait", 0.0), sum(t)


def _wait_ready(ping: Callable[[], int], want: int, procs: list[Proc], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited at start:\n{log_tail(proc)}")
        if ping() >= want:
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{log_tail(p)}" for p in procs)
    raise RuntimeError(f"workers not ready within {timeout_s:g} s:\n{tails}")


def measure(
    setup: Setup,
    phase: Phase,
    procs: list[Proc],
    submit: Callable[[int, str], list[str]],
    results: Any,
    succeeded: Callable[[dict[str, Any]], bool],
) -> Phase:
    """Warm up, take the idle figures, run ``phase.jobs`` jobs, take the busy ones."""
    args = setup.args
    pids = [p.popen.pid for p in procs]
    warm = submit(max(8, len(procs) * 8), WARMUP_MODEL)
    out = wait_for_results(results, warm, succeeded=succeeded, timeout_s=60)
    if out.finished < len(warm):
        raise RuntimeError(f"{phase.system}: warm-up jobs did not finish ({out.finished})")
    if out.failed:
        raise RuntimeError(f"{phase.system}: warm-up failed: {next(iter(out.failed.values()))}")
    # Idle: memory, and the CPU an idle worker spends anyway (heartbeats, polling), which the
    # net CPU per job leaves out: it matters for a baseline that completes few jobs.
    time.sleep(0.5)
    idle_cpu0, idle_t0 = cpu_ns(pids), time.monotonic()
    idle = []
    while time.monotonic() - idle_t0 < IDLE_S:
        idle.append(memory(pids))
        time.sleep(SAMPLE_S)
    idle_cpu_rate = (cpu_ns(pids) - idle_cpu0) / 1e9 / (time.monotonic() - idle_t0)
    rss_idle = min(r for r, _ in idle)

    others = [setup.upstream_pid] + ([setup.redis_pid] if setup.redis_pid else [])
    driver0 = sum(os.times()[:2])
    user0, sys0 = cpu_times(pids)
    cpu0 = user0 + sys0, cpu_s([setup.upstream_pid]), cpu_s(others[1:])
    machine0 = _machine_busy()
    setup.upstream.get(reset=True)
    sampler = Sampler(pids, setup.upstream)
    sampler.start()
    started = time.time()
    ids = submit(phase.jobs, MODEL)
    expected_s = args.stream_seconds * phase.jobs / phase.slots
    outcome = wait_for_results(
        results,
        ids,
        succeeded=succeeded,
        timeout_s=args.phase_timeout or 2 * expected_s + 60,
        window=2 * phase.slots,
    )
    ended = time.time()
    sampler.stop()
    upstream_peak = setup.upstream.get()["peak"]  # since the reset at the phase's start
    driver1 = sum(os.times()[:2])
    user1, sys1 = cpu_times(pids)
    cpu1 = user1 + sys1, cpu_s([setup.upstream_pid]), cpu_s(others[1:])
    machine1 = _machine_busy()

    phase.completed = len(outcome.done)
    phase.failed = len(outcome.failed)
    phase.first_error = next(iter(outcome.failed.values()), "")
    if outcome.finished < len(ids) and not phase.first_error:
        phase.first_error = f"{len(ids) - outcome.finished} jobs unfinished at the timeout"
    phase.rate, w0, w1 = steady_rate(list(outcome.done.values()), phase.slots, started)
    phase.limit = phase.slots / args.stream_seconds
    samples = sampler.samples
    # The upstream counts its open streams exactly (samples every SAMPLE_S can miss the top).
    phase.peak_in_flight = max(max((s.active for s in samples), default=0), upstream_peak)
    window = [s.active for s in samples if w0 <= s.t <= w1]
    phase.mean_in_flight = sum(window) / len(window) if window else 0.0
    phase.rss_idle_mb = rss_idle / 2**20
    phase.rss_peak_mb = max((s.rss for s in samples), default=rss_idle) / 2**20
    phase.pss_peak_mb = max((s.pss for s in samples), default=0) / 2**20
    if phase.peak_in_flight:
        phase.kb_per_in_flight = (
            (phase.rss_peak_mb - phase.rss_idle_mb) * 1024 / phase.peak_in_flight
        )
    phase.mb_pss_per_slot = phase.pss_peak_mb / phase.slots
    n = max(phase.completed, 1)
    phase.cpu_ms_per_job = (cpu1[0] - cpu0[0]) * 1000 / n
    phase.cpu_ms_per_job_net = (cpu1[0] - cpu0[0] - idle_cpu_rate * (ended - started)) * 1000 / n
    phase.cpu_system_pct = 100.0 * (sys1 - sys0) / max(cpu1[0] - cpu0[0], 1e-9)
    phase.idle_cpu_pct = 100.0 * idle_cpu_rate
    phase.upstream_cpu_ms_per_job = (cpu1[1] - cpu0[1]) * 1000 / n
    phase.redis_cpu_ms_per_job = (cpu1[2] - cpu0[2]) * 1000 / n if setup.redis_pid else 0.0
    phase.driver_cpu_ms_per_job = (driver1 - driver0) * 1000 / n
    phase.wall_s = ended - started
    idle_d, total_d = machine1[0] - machine0[0], machine1[1] - machine0[1]
    busy_cores = (total_d - idle_d) / max(total_d, 1e-9) * (os.cpu_count() or 1)
    ours_cores = sum(cpu1) - sum(cpu0) + driver1 - driver0
    phase.machine_busy_pct = 100.0 * (total_d - idle_d) / max(total_d, 1e-9)
    phase.others_busy_pct = (
        100.0 * max(busy_cores - ours_cores / phase.wall_s, 0.0) / (os.cpu_count() or 1)
    )
    counts = log_warnings(procs)
    phase.log_warnings, phase.log_errors = counts["WARNING"], counts["ERROR"]
    if sampler.error:
        print(f"  (sampler: {sampler.error})", file=sys.stderr)
    return phase


def run_conveyor(setup: Setup) -> Phase:
    args = setup.args
    url = f"{setup.redis_url_base}/{CONVEYOR_DB}"
    per_process = args.concurrency // args.processes
    env = _clean_env()
    env.update(
        REDIS_URL=url,
        # Postgres is not on the path of a successful ai job (its episode is a message to the
        # episodes queue); a failed one would spill its dead letter to Redis.
        DATABASE_URL="postgresql://bench@127.0.0.1:9/none",
        CONVEYOR_HOME=str(setup.processes.log_dir / "home"),
        LLM_BASE_URL=f"http://127.0.0.1:{setup.upstream_port}/v1",
        LLM_MODEL=MODEL,
        CONVEYOR_AI_POOL=args.pool,
        CONVEYOR_AI_CONCURRENCY=str(per_process),
    )
    if args.progress_interval is not None:
        env["CONVEYOR_AI_PROGRESS_INTERVAL"] = str(args.progress_interval)
    for setting in args.worker_env:
        name, _, value = setting.partition("=")
        env[name] = value
    os.environ["REDIS_URL"] = url  # the submitter (ClientConfig.from_env) reads it
    from conveyor import Submitter

    submitter = Submitter(broker_url=url, redis_url=url)
    procs = [
        setup.processes.start(
            f"conveyor-ai{n}",
            [sys.executable, "-m", "workers.cli", "worker", "ai", f"--hostname=ai{n}@%h"],
            env,
        )
        for n in range(args.processes)
    ]
    phase = Phase(
        system="conveyor ai pool",
        layout=f"{args.processes}x{per_process} {args.pool}",
        slots=per_process * args.processes,
        jobs=args.jobs,
    )
    try:
        _wait_ready(lambda: len(submitter.app.control.ping(timeout=0.5)), len(procs), procs, 60)

        def submit(count: int, model: str) -> list[str]:
            payloads = [
                {
                    "messages": [{"role": "user", "content": f"bench question {n}"}],
                    "model": model,
                    "user_id": "bench",
                }
                for n in range(count)
            ]
            return [job.id for job in submitter.submit_many("ai.chat", payloads)]

        return measure(
            setup,
            phase,
            procs,
            submit,
            submitter.redis,
            succeeded=lambda meta: (
                isinstance(meta.get("result"), dict) and meta["result"].get("success") is True
            ),
        )
    finally:
        setup.processes.stop(procs)
        submitter.close()


def run_baseline(setup: Setup) -> Phase:
    args = setup.args
    url = f"{setup.redis_url_base}/{BASELINE_DB}"
    env = _clean_env()
    env[BASELINE_URL_ENV] = url
    baseline_app.conf.broker_url = url
    baseline_app.conf.result_backend = url
    proc = setup.processes.start(
        "baseline-prefork",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.ai_inflight:baseline_app",
            "worker",
            "--pool=prefork",
            f"--concurrency={args.baseline_concurrency}",
            "--loglevel=WARNING",
            "--hostname=baseline@%h",
        ],
        env,
    )
    jobs = args.baseline_concurrency * args.baseline_rounds
    phase = Phase(
        system="plain celery prefork",
        layout=f"1x{args.baseline_concurrency} prefork",
        slots=args.baseline_concurrency,
        jobs=jobs,
    )
    upstream_url = f"http://127.0.0.1:{setup.upstream_port}/v1/chat/completions"
    client = baseline_app.backend.client
    try:
        _wait_ready(lambda: len(baseline_app.control.ping(timeout=0.5)), 1, [proc], 60)

        def submit(count: int, model: str) -> list[str]:
            with baseline_app.producer_or_acquire() as producer:
                return [
                    baseline_app.send_task(
                        BASELINE_TASK,
                        args=(upstream_url, model, f"bench question {n}"),
                        producer=producer,
                    ).id
                    for n in range(count)
                ]

        return measure(setup, phase, [proc], submit, client, succeeded=lambda meta: True)
    finally:
        setup.processes.stop([proc])


def _clean_env() -> dict[str, str]:
    """This environment without anything that would point a worker elsewhere."""
    drop = ("REDIS_URL", "DATABASE_URL", "CELERY_", "LLM_", "CONVEYOR_", BASELINE_URL_ENV)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(ROOT)
    return env


# --- The report --------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def report(phases: list[Phase], args: argparse.Namespace, load: dict[str, Any]) -> None:
    headers = (
        "system",
        "layout",
        "in flight peak/mean",
        "jobs/s",
        "% of limit",
        "RSS idle→peak MB",
        "KB/in-flight job",
        "PSS MB/slot",
        "CPU ms/job gross/net",
        "upstream ms/job",
        "redis ms/job",
        "ok/failed",
    )
    rows = [
        (
            p.system,
            p.layout,
            f"{p.peak_in_flight}/{p.mean_in_flight:.0f}",
            f"{p.rate:.1f}",
            f"{p.pct_of_limit:.1f} % of {p.limit:g}",
            f"{p.rss_idle_mb:.0f}→{p.rss_peak_mb:.0f}",
            f"{p.kb_per_in_flight:.0f}",
            f"{p.mb_pss_per_slot:.2f}",
            f"{p.cpu_ms_per_job:.2f}/{p.cpu_ms_per_job_net:.2f}",
            f"{p.upstream_cpu_ms_per_job:.2f}",
            f"{p.redis_cpu_ms_per_job:.2f}",
            f"{p.completed}/{p.failed}",
        )
        for p in phases
    ]
    by = {p.system: p for p in phases}
    ours, base = by.get("conveyor ai pool"), by.get("plain celery prefork")
    ratios = {}
    if ours and base:
        ratios = {
            "jobs_per_s": _ratio(ours.rate, base.rate),
            "pct_of_limit": _ratio(ours.pct_of_limit, base.pct_of_limit),
            "kb_per_in_flight_job": _ratio(ours.kb_per_in_flight, base.kb_per_in_flight),
            "pss_mb_per_slot": _ratio(ours.mb_pss_per_slot, base.mb_pss_per_slot),
            "cpu_ms_per_job_net": _ratio(ours.cpu_ms_per_job_net, base.cpu_ms_per_job_net),
        }
        rows.append(
            (
                "ours / baseline",
                "",
                "",
                f"{ratios['jobs_per_s']}x",
                f"{ratios['pct_of_limit']}x",
                "",
                f"{ratios['kb_per_in_flight_job']}x",
                f"{ratios['pss_mb_per_slot']}x",
                f"{ratios['cpu_ms_per_job_net']}x (net)",
                "",
                "",
                "",
            )
        )
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    print(
        f"\nupstream: {args.stream_seconds:g} s per answer in {args.chunks} chunks; "
        f"load average {load['before']} before, {load['after']} after; "
        + "; ".join(
            f"{p.system}: machine {p.machine_busy_pct:.0f} % busy, "
            f"{p.others_busy_pct:.0f} % by other processes, {p.wall_s:.0f} s, "
            f"{p.log_warnings} warning / {p.log_errors} error log lines"
            for p in phases
        )
    )
    for p in phases:
        if p.first_error:
            print(f"{p.system}: first failure: {p.first_error}")
    if ours:
        met = ours.peak_in_flight >= TARGET_IN_FLIGHT and ours.pct_of_limit >= TARGET_PCT
        print(
            f"issue 3's target: >= {TARGET_IN_FLIGHT} in flight and >= {TARGET_PCT:g} % of the "
            f"limit: {'met' if met else 'NOT met'} ({ours.peak_in_flight} in flight, "
            f"{ours.pct_of_limit:.1f} %)"
        )
    figures = {
        "bench": "ai_inflight",
        "stream_seconds": args.stream_seconds,
        "chunks": args.chunks,
        "progress_interval_s": args.progress_interval,
        "cpus": os.cpu_count(),
        "load": load,
        "phases": [
            {**{k: v for k, v in vars(p).items()}, "pct_of_limit": round(p.pct_of_limit, 2)}
            for p in phases
        ],
        "ratios_ours_over_baseline": ratios,
    }
    print(json.dumps(figures, default=lambda v: round(v, 3) if isinstance(v, float) else str(v)))


# --- Main --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        prog="python -m bench.ai_inflight",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--jobs", type=int, default=5000, help="jobs for the ai pool (default 5000)")
    p.add_argument("--concurrency", type=int, default=500, help="ai pool slots in all (500)")
    p.add_argument("--processes", type=int, default=2, help="ai worker processes (2)")
    p.add_argument("--pool", default="threads", help="ai pool implementation (threads)")
    p.add_argument("--stream-seconds", type=float, default=5.0, help="answer time (5 s)")
    p.add_argument("--chunks", type=int, default=50, help="content chunks per answer (50)")
    p.add_argument(
        "--progress-interval",
        type=float,
        default=None,
        help="CONVEYOR_AI_PROGRESS_INTERVAL for the ai pool (default: the project's, 0.1 s)",
    )
    p.add_argument(
        "--baseline-concurrency",
        type=int,
        default=2 * cores,
        help=f"prefork processes of the baseline (2 x cores = {2 * cores})",
    )
    p.add_argument("--baseline-rounds", type=int, default=6, help="baseline jobs per slot (6)")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the ai workers, e.g. CONVEYOR_AI_PREFETCH=2 (repeatable)",
    )
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--skip-conveyor", action="store_true")
    p.add_argument(
        "--redis-url",
        help="a Redis server to use instead of an embedded Valkey (DBs 1 and 2 are flushed)",
    )
    p.add_argument("--phase-timeout", type=float, help="seconds to wait for a phase's jobs")
    p.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    p.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return p


def _start_upstream(processes: Processes, args: argparse.Namespace) -> tuple[Proc, int]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.ai_inflight",
        "--serve-upstream",
        str(port),
        "--stream-seconds",
        str(args.stream_seconds),
        "--chunks",
        str(args.chunks),
    ]
    proc = processes.start("upstream", argv, _clean_env())
    stats = UpstreamStats(port)
    deadline = time.monotonic() + 20
    while True:
        try:
            stats.get()
            stats.close()
            return proc, port
        except OSError:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the upstream did not start:\n{log_tail(proc)}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def _redis(args: argparse.Namespace, work: Path) -> Iterator[tuple[str, int | None]]:
    """(URL without DB number, server pid or None): the given server, or an embedded Valkey."""
    import redis

    if args.redis_url:
        base = args.redis_url.rstrip("/")
        if base.rsplit("/", 1)[-1].isdigit():
            base = base.rsplit("/", 1)[0]
        for db in (CONVEYOR_DB, BASELINE_DB):
            redis.Redis.from_url(f"{base}/{db}").flushdb()
        yield base, None
        return
    from workers.dev.embedded import EmbeddedRedis

    server = EmbeddedRedis(work / "valkey", persist=False)
    server.start()
    try:
        yield server.url.rsplit("/", 1)[0], server.pid
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.stream_seconds, args.chunks)
        return 0
    if args.concurrency % args.processes:
        raise SystemExit("--concurrency must divide evenly by --processes")
    if args.jobs < 3 * args.concurrency:
        raise SystemExit("--jobs must be at least 3 x --concurrency (ramp, steady state, tail)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    processes = Processes(work)
    load = {"before": [round(x, 2) for x in os.getloadavg()]}
    phases: list[Phase] = []
    try:
        upstream_proc, port = _start_upstream(processes, args)
        with _redis(args, work) as (redis_base, redis_pid):
            setup = Setup(
                redis_url_base=redis_base,
                upstream_port=port,
                upstream_pid=upstream_proc.popen.pid,
                redis_pid=redis_pid,
                processes=processes,
                upstream=UpstreamStats(port),
                args=args,
            )
            if not args.skip_conveyor:
                print(f"conveyor ai pool: {args.jobs} jobs, {args.concurrency} slots …", flush=True)
                phases.append(run_conveyor(setup))
            if not args.skip_baseline:
                print(f"plain celery prefork: -c {args.baseline_concurrency} …", flush=True)
                phases.append(run_baseline(setup))
            setup.upstream.close()
    finally:
        processes.stop()
        if args.keep_logs:
            print(f"logs: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    load["after"] = [round(x, 2) for x in os.getloadavg()]
    report(phases, args, load)
    return 0 if all(p.completed == p.jobs for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
