"""Reading a job's events without a gap or a duplicate: the rule every follower shares (the
library's ``Job.events``, the gateway's SSE and WebSocket streams, ``conveyor events``).

A job's events are numbered 1, 2, 3… by ``seq`` with no hole (one Lua script numbers and
stores them), so a follower that remembers the last ``seq`` it delivered knows exactly what
comes next. Its capped stream may have dropped the oldest: a follower asking for those gets
one explicit gap marker instead, and can read the job's result.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from conveyor.envelopes import TERMINAL_TYPES


def gap(job_id: str, from_seq: int, to_seq: int | None) -> dict[str, Any]:
    """The marker for events ``from_seq``..``to_seq`` (inclusive) that cannot be delivered
    (``to_seq`` None: every event from ``from_seq`` on has expired)."""
    return {"control": "gap", "job_id": job_id, "from_seq": from_seq, "to_seq": to_seq}


def decode(fields: Any) -> dict[str, Any]:
    """One stream entry's event (``fields`` as redis-py returns them, bytes or str keys)."""
    raw = fields.get(b"event", fields.get("event")) if isinstance(fields, dict) else None
    if raw is None:
        raise ValueError("a stream entry without an event field")
    event: dict[str, Any] = json.loads(raw)
    return event


class Follower:
    """Which events of one job to deliver next, given those seen so far.

    Feed it events in any order and any number of times (a replay and a live channel
    overlap); it hands back, in ``seq`` order, each event once, and a gap marker where
    events were trimmed away. ``missing`` says when the live feed skipped some (read the
    stream again)."""

    def __init__(self, job_id: str, after_seq: int = 0):
        self.job_id = job_id
        #: The last seq delivered (or skipped over by a gap).
        self.last_seq = after_seq
        self.ended = False
        self._held: dict[int, dict[str, Any]] = {}

    def replay(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Deliver from a full read of the stream: what it holds past ``last_seq``, with a gap
        marker first when the oldest it holds is beyond the next one expected."""
        events = list(events)
        self._end_if_past(events)
        fresh = sorted(
            (e for e in events if int(e.get("seq", 0)) > self.last_seq), key=lambda e: e["seq"]
        )
        out: list[dict[str, Any]] = []
        if fresh and int(fresh[0]["seq"]) > self.last_seq + 1:
            out.append(gap(self.job_id, self.last_seq + 1, int(fresh[0]["seq"]) - 1))
            self.last_seq = int(fresh[0]["seq"]) - 1
            self._held = {s: e for s, e in self._held.items() if s > self.last_seq}
        for event in fresh:
            self._held[int(event["seq"])] = event
        return out + self._release()

    def live(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Deliver from the live channel: in order, holding back what comes early."""
        seq = int(event.get("seq", 0))
        self._end_if_past([event])
        if seq > self.last_seq:
            self._held[seq] = event
        return self._release()

    def _end_if_past(self, events: list[dict[str, Any]]) -> None:
        """A terminal event at or before the last seq delivered: the job ended before where
        the caller started (a ``from_seq`` past its end); nothing more will come."""
        for event in events:
            if event.get("type") in TERMINAL_TYPES and int(event.get("seq", 0)) <= self.last_seq:
                self.ended = True
                self._held.clear()

    def skip(self, to_seq: int, *, ended: bool = False) -> list[dict[str, Any]]:
        """Give up on events up to ``to_seq`` (dropped for a slow reader): a gap marker for
        those not yet delivered, then whatever was held back behind them. ``ended``: the
        job's terminal event was among them, so the gap is the end."""
        out: list[dict[str, Any]] = []
        if to_seq > self.last_seq and not self.ended:
            out.append(gap(self.job_id, self.last_seq + 1, to_seq))
            self.last_seq = to_seq
            self._held = {s: e for s, e in self._held.items() if s > to_seq}
            if ended:
                self.ended = True
                self._held.clear()
        return out + self._release()

    @property
    def missing(self) -> bool:
        """Events arrived past a hole: the live feed lost some, read the stream again."""
        return bool(self._held)

    def _release(self) -> list[dict[str, Any]]:
        out = []
        while not self.ended and self.last_seq + 1 in self._held:
            event = self._held.pop(self.last_seq + 1)
            self.last_seq += 1
            out.append(event)
            if event.get("type") in TERMINAL_TYPES:
                self.ended = True
                self._held.clear()
        return out
