"""The harness's own Valkey, and what Redis did meanwhile.

The harness starts one embedded Valkey on a free port (never the machine's Redis) and reads
its ``INFO`` before and after each measured window:

- **commands**: ``total_commands_processed`` (equal to the sum of ``INFO commandstats``
  calls): every command a client sent *and* every command a Lua script ran (an ``EVALSHA``
  running five ``redis.call`` counts 6);
- **round trips**: ``total_reads_processed``: read events on client sockets. A request, a whole
  pipeline or a whole script call arrives in one read, so this counts round trips, not
  commands (a blocking pop that waits is one round trip);
- per-command counts (``commandstats``), for the breakdown.

What the harness itself sent in the window (its polls, and the ``INFO`` that opened it) is
counted client-side and subtracted, so the figures are the system's alone.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis


class Valkey:
    """An embedded Valkey (``workers.dev.embedded``) on a free port, without persistence."""

    def __init__(self, data_dir: Path):
        from workers.dev.embedded import EmbeddedRedis

        self._server = EmbeddedRedis(data_dir, persist=False)
        self.url = ""

    def start(self) -> str:
        self.url = self._server.start()
        return self.url

    @property
    def pid(self) -> int | None:
        return self._server.pid

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._server.stop()


@dataclass
class Snapshot:
    commands: int
    reads: int
    per_command: Counter[str]


@dataclass
class Usage:
    """What the system under test made Redis do in a window (the harness's share removed)."""

    commands: int
    reads: int
    per_command: dict[str, int] = field(default_factory=dict)

    def per_job(self, jobs: int) -> dict[str, Any]:
        return {
            "commands_per_job": round(self.commands / jobs, 2),
            "round_trips_per_job": round(self.reads / jobs, 2),
            "commands_by_name_per_job": {
                name: round(count / jobs, 2)
                for name, count in sorted(self.per_command.items(), key=lambda kv: -kv[1])
                if count / jobs >= 0.005
            },
        }


class Accountant:
    """A harness client that counts what it sends, and reads the server's counters."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self._sent_commands: Counter[str] = Counter()
        self._sent_reads = 0

    def snapshot(self) -> Snapshot:
        info = self.client.info("all")
        self._sent(["info"])
        per_command = Counter(
            {
                k[len("cmdstat_") :]: int(v["calls"])
                for k, v in info.items()
                if k.startswith("cmdstat_")
            }
        )
        # The INFO that answers is counted after it replies: the next snapshot sees it.
        return Snapshot(
            int(info["total_commands_processed"]), int(info["total_reads_processed"]), per_command
        )

    def pipeline_counts(self, ops: list[tuple[str, str]]) -> list[int]:
        """Run (command, key) reads (``llen``, ``hlen``, ``zcard``, ``scard``) in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for command, key in ops:
            getattr(pipe, command)(key)
        self._sent([c for c, _ in ops])
        return [int(x or 0) for x in pipe.execute()]

    def _sent(self, commands: list[str]) -> None:
        self._sent_commands.update(commands)
        self._sent_reads += 1

    def mark(self) -> tuple[Counter[str], int]:
        return Counter(self._sent_commands), self._sent_reads

    def usage(self, before: Snapshot, after: Snapshot, mark: tuple[Counter[str], int]) -> Usage:
        """The server's counters from ``before`` to ``after``, less what this client sent after
        ``mark`` (taken just before ``before``), the last snapshot's own INFO excepted."""
        sent_commands = self._sent_commands - mark[0]
        sent_commands["info"] -= 1  # the closing INFO is not in ``after``
        sent_reads = self._sent_reads - mark[1] - 1
        per_command = Counter(after.per_command)
        per_command.subtract(before.per_command)
        per_command.subtract(sent_commands)
        return Usage(
            commands=after.commands - before.commands - sum(sent_commands.values()),
            reads=after.reads - before.reads - sent_reads,
            per_command={k: v for k, v in per_command.items() if v > 0},
        )

    def flush(self) -> None:
        self.client.flushdb()
