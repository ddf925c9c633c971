"""Where a worker's CPU goes during a drain: py-spy on the worker's whole process tree.

Only with ``--profile`` (py-spy samples the processes, which slows them a little: the
profiled drain is an extra one, not a measured one). Samples at ``RATE`` Hz for the drain's
length; reports, per process role (the prefork parent: consumer, broker I/O, acks; the child:
the task), the functions with the most samples on-CPU at the top of the stack (self) and
anywhere in it (inclusive).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.compare_parts import procs
from bench.compare_parts.drain import Backlog, Poller, restore
from bench.compare_parts.server import Accountant
from bench.compare_parts.systems import System

RATE = 250
TOP = 12
#: Frames on at least this share of a process's samples are its skeleton (main loop).
SKELETON = 0.8
_PROCESS = re.compile(r'^process (\d+):"(.*)"$')


def _py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)" with a package hint
    m = re.match(r"^(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    fn, path = m.groups()
    parts = Path(path).parts
    where = "/".join(parts[-2:]) if "site-packages" in path else "/".join(parts[-3:])
    for marker in ("site-packages/",):
        if marker in path:
            where = path.split(marker, 1)[1]
    return f"{fn} ({where})"


#: Where a frame's code lives, by path fragment (first match wins), for the breakdown.
_COMPONENTS = [
    ("conveyor", ("/workers/", "/conveyor/", "/tasks/")),
    ("redis-py", ("redis/",)),
    ("kombu", ("kombu/",)),
    ("billiard (prefork IPC)", ("billiard/",)),
    ("celery", ("celery/",)),
    ("pydantic", ("pydantic",)),
    ("json", ("json/",)),
]


#: Known places of a Celery/Conveyor worker, reported by their share of the process's samples
#: (anywhere on the stack): (label, function as py-spy names it, file fragment).
PROBES = [
    ("Conveyor job wrapper, all of it", "job.<locals>.register.<locals>.run", "runtime/job.py"),
    ("  delivery count + cancel check", "_check_delivery", "runtime/job.py"),
    ("  payload validation", "_validate", "runtime/job.py"),
    ("  complete event (Lua script)", "complete", "runtime/job.py"),
    ("Conveyor event sender thread", "EventPublisher._send_forever", "runtime/events.py"),
    ("Celery result backend: store_result", "Backend.store_result", "celery/backends/base.py"),
    ("  its GET of the current state", "BaseKeyValueStoreBackend._get_task_meta_for", "celery/"),
    ("Celery task events: send (buffered)", "EventDispatcher.send", "celery/events/dispatcher.py"),
    (
        "Celery task events: flushed to Redis",
        "Consumer._flush_events",
        "worker/consumer/consumer.py",
    ),
    ("kombu: new Redis client per fanout publish", "Channel._create_client", "kombu/transport"),
    ("kombu: BRPOP read (delivery)", "Channel._brpop_read", "kombu/transport/redis.py"),
    ("kombu: ack (unacked hash)", "QoS.ack", "kombu/transport/redis.py"),
    ("prefork IPC: child -> parent", "_SimpleQueue.put", "billiard/queues.py"),
    ("prefork IPC: parent -> child", "send_offset", "billiard/compat.py"),
]


def _probe_hits(frames: list[str]) -> set[str]:
    hits = set()
    for label, function, where in PROBES:
        for f in frames:
            if f.startswith(function + " (") and where in f:
                hits.add(label)
                break
    return hits


def _component(frame: str) -> str:
    m = re.match(r"^.* \((.*?):\d+\)$", frame)
    path = m.group(1) if m else frame
    for name, fragments in _COMPONENTS:
        if any(f in path for f in fragments):
            return name
    return "other"


def summarize(raw: str) -> dict[str, Any]:
    """Per process: samples on CPU, self samples by component and by function, and the
    functions most often anywhere on the stack below the common skeleton (the frames in
    nearly every sample: the worker's main loop)."""
    by_role: dict[str, dict[str, Counter[str]]] = defaultdict(
        lambda: {
            "self": Counter(),
            "inclusive": Counter(),
            "component": Counter(),
            "probe": Counter(),
        }
    )
    totals: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # With --subprocesses a stack starts with its process's ancestry: "process PID:cmd"
        # frames, the process it was sampled in last.
        role = "process"
        while frames and (m := _PROCESS.match(frames[0])):
            role = f"pid {m.group(1)}"
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        totals[role] += count
        by_role[role]["self"][_short(frames[-1])] += count
        by_role[role]["component"][_component(frames[-1])] += count
        for f in {_short(f) for f in frames}:
            by_role[role]["inclusive"][f] += count
        for label in _probe_hits(frames):
            by_role[role]["probe"][label] += count
    out = {}
    for role, counters in by_role.items():
        total = totals[role]

        def pct(c: int, total: int = total) -> float:
            return round(100 * c / total, 1)

        below = [(f, c) for f, c in counters["inclusive"].most_common() if c < SKELETON * total]
        out[role] = {
            "samples": total,
            "self_by_component": [(f, pct(c)) for f, c in counters["component"].most_common()],
            "self": [(f, pct(c)) for f, c in counters["self"].most_common(TOP)],
            "inclusive": [(f, pct(c)) for f, c in below[: TOP * 2]],
            "probes": [
                (label, pct(counters["probe"][label]))
                for label, _, _ in PROBES
                if counters["probe"][label]
            ],
        }
    return out


def profile(
    acc: Accountant,
    group: procs.Group,
    system: System,
    backlog: Backlog,
    env: dict[str, str],
    work: Path,
    seconds: float,
) -> dict[str, Any]:
    spy = _py_spy()
    if spy is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    restore(acc, backlog)
    poller = Poller(acc, system)
    workers = [group.start(n, a, {**env, **e}) for n, a, e in system.commands()]
    try:
        deadline = time.perf_counter() + 60
        while poller.read()[0] >= backlog.jobs:
            if time.perf_counter() > deadline or not all(w.alive() for w in workers):
                return {"error": f"{system.key}: the worker did not start"}
            time.sleep(0.005)
        roles = {}
        for w in workers:
            tree = procs.tree(w.pid)
            if tree:
                roles[str(tree[0].pid)] = f"{w.name} (parent)"
                for child in tree[1:]:
                    roles[str(child.pid)] = f"{w.name} (child)"
        out = work / f"profile-{system.key}.txt"
        argv = [
            spy,
            "record",
            "--pid",
            str(workers[0].pid),
            "--subprocesses",
            "--rate",
            str(RATE),
            "--duration",
            str(max(1, int(seconds))),
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        if run.returncode != 0 or not out.exists():
            return {"error": f"py-spy failed: {run.stderr.strip()[-500:]}"}
        summary = summarize(out.read_text())
        return {
            "system": system.key,
            "seconds": seconds,
            "rate_hz": RATE,
            "roles": {roles.get(k.removeprefix("pid "), k): v for k, v in summary.items()},
        }
    finally:
        group.stop(workers)
