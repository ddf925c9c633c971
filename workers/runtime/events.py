"""Publishing job events: one envelope (DESIGN.md), to a pub/sub channel for live listeners
and to a capped stream for late ones, numbered by a per-job ``seq``.

All three writes and the numbering happen in one Lua script, so ``seq`` order is stream order
even when several threads or processes publish events of one job; one call of it publishes a
whole batch of events.

``publish_soon`` is for the many small events of a busy process (a generation's progress): it
queues the event, and one thread sends everything queued every ``batch_s`` in one pipelined
round trip, instead of one round trip (and one connection, and one wake-up of the waiting
thread) per event. ``publish`` sends the job's own queued events first, in the same round
trip, so a job's events still reach Redis in the order it made them; it waits for nothing
but a batch already on its way with events of the same job.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from typing import Any

import redis

from conveyor import keys
from conveyor.envelopes import EventType, utc_now_iso

log = logging.getLogger(__name__)

#: Seconds a queued event may wait for its batch: well under the 0.1 s progress interval.
BATCH_S = 0.05
#: Seconds ``publish`` waits for a batch on its way (a pipeline bounded by the socket timeout).
_BATCH_WAIT_S = 60.0

#: Events one script call publishes at most: Redis runs nothing else meanwhile (~10 µs each).
_PER_CALL = 200

#: One event ready to send: its keys (seq counter, stream, channel), and the envelope's JSON
#: before and after its seq number.
_Event = tuple[tuple[str, str, str], str, str]

# Publishes N events in order. KEYS, three per event: its seq counter, stream, channel.
# ARGV[1] stream max length (approximate), ARGV[2] TTL in seconds of the stream and counter;
# then two per event: the envelope JSON up to and including '"seq":', and the rest after the
# number. Returns each event's seq.
_PUBLISH = """
local seqs = {}
for i = 1, #KEYS / 3 do
  local k = 3 * (i - 1)
  local seq = redis.call('INCR', KEYS[k + 1])
  redis.call('EXPIRE', KEYS[k + 1], ARGV[2])
  local event = ARGV[1 + 2 * i] .. seq .. ARGV[2 + 2 * i]
  redis.call('XADD', KEYS[k + 2], 'MAXLEN', '~', ARGV[1], '*', 'event', event)
  redis.call('EXPIRE', KEYS[k + 2], ARGV[2])
  redis.call('PUBLISH', KEYS[k + 3], event)
  seqs[i] = seq
end
return seqs
"""


def _json(data: dict[str, Any]) -> str:
    """``data`` as JSON; what JSON cannot hold (a datetime, say) as its ``str``. The plain
    call first: with ``default`` set, ``json`` builds a new encoder every time."""
    try:
        return json.dumps(data)
    except TypeError:
        return json.dumps(data, default=str)


@functools.lru_cache(maxsize=4096)
def _head(type: str, component: str, event: str, job_id: str) -> str:
    """The envelope up to its seq: the same for every event of one name of one job."""
    return (
        f'{{"type":{json.dumps(type)},"component":{json.dumps(component)},'
        f'"event":{json.dumps(event)},"job_id":{json.dumps(job_id)},"seq":'
    )


@functools.lru_cache(maxsize=4096)
def _keys_of(job_id: str) -> tuple[str, str, str]:
    return keys.events_seq(job_id), keys.events_stream(job_id), keys.events_channel(job_id)


class _Batch:
    """Queued events on their way to Redis, and whose they are."""

    def __init__(self, job_ids: frozenset[str]):
        self.job_ids = job_ids
        self.sent = threading.Event()


class EventPublisher:
    """Publishes the events of jobs to Redis; safe to share between threads."""

    def __init__(
        self, client: redis.Redis, *, stream_maxlen: int, ttl_s: int, batch_s: float = BATCH_S
    ):
        self._client = client
        self._script = client.register_script(_PUBLISH)
        self._maxlen = stream_maxlen
        self._ttl = ttl_s
        self._batch_s = batch_s
        self._lock = threading.Lock()  # guards _queued and _in_flight
        self._queued: dict[str, list[_Event]] = {}  # job id -> its queued events, in order
        self._in_flight: _Batch | None = None
        self._send_lock = threading.Lock()  # one batch at a time
        self._sender: threading.Thread | None = None
        self._sender_pid = 0

    def publish(
        self,
        job_id: str,
        *,
        type: EventType,
        component: str,
        event: str,
        data: dict[str, Any],
        request_id: str | None = None,
    ) -> int:
        """Publish one event now, after the job's queued ones; returns its ``seq``."""
        new = self._event(job_id, type, component, event, data, request_id)
        with self._lock:
            mine = self._queued.pop(job_id, [])
            batch = self._in_flight
        if batch is not None and job_id in batch.job_ids:
            batch.sent.wait(_BATCH_WAIT_S)  # earlier events of this job are on their way
        return self._send([*mine, new])[-1]

    def publish_soon(
        self,
        job_id: str,
        *,
        type: EventType,
        component: str,
        event: str,
        data: dict[str, Any],
        request_id: str | None = None,
    ) -> None:
        """Queue one event for the next batch (within ``batch_s``). Its timestamp is now; a
        failure to send it is logged, not raised: for events a job can do without."""
        new = self._event(job_id, type, component, event, data, request_id)
        with self._lock:
            self._queued.setdefault(job_id, []).append(new)
        if self._sender_pid != os.getpid():
            self._start_sender()

    def flush(self) -> None:
        """Send every queued event now."""
        with self._send_lock:
            with self._lock:
                if not self._queued:
                    return
                queued, self._queued = self._queued, {}
                batch = self._in_flight = _Batch(frozenset(queued))
            try:
                self._send([e for events in queued.values() for e in events])
            except Exception:
                log.exception(
                    "could not publish the queued events of %d job(s)", len(batch.job_ids)
                )
            finally:
                with self._lock:
                    self._in_flight = None
                batch.sent.set()

    def _event(
        self,
        job_id: str,
        type: str,
        component: str,
        event: str,
        data: dict[str, Any],
        request_id: str | None = None,
    ) -> _Event:
        # The request that made the job, when one did (the gateway's X-Request-ID): after
        # DESIGN.md's fields, so a dashboard that knows only those reads on unchanged.
        extra = f',"request_id":{json.dumps(request_id)}' if request_id else ""
        tail = f',"data":{_json(data)},"timestamp":"{utc_now_iso()}"{extra}}}'
        return _keys_of(job_id), _head(type, component, event, job_id), tail

    def _send(self, events: list[_Event]) -> list[int]:
        """Runs the script over the events, in order, in one round trip; the ``seq`` of each."""
        calls: list[tuple[list[str], list[Any]]] = []
        for start in range(0, len(events), _PER_CALL):
            keys_: list[str] = []
            args: list[Any] = [self._maxlen, self._ttl]
            for event_keys, head, tail in events[start : start + _PER_CALL]:
                keys_ += event_keys
                args += (head, tail)
            calls.append((keys_, args))
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            for keys_, args in calls:
                pipe.evalsha(self._script.sha, len(keys_), *keys_, *args)
            try:
                return [int(seq) for seqs in pipe.execute() for seq in seqs]
            except redis.exceptions.NoScriptError:  # a new or restarted server: none ran
                if attempt == 2:
                    raise
                self._client.script_load(_PUBLISH)
        raise AssertionError("unreachable")

    def _start_sender(self) -> None:
        with self._lock:
            if self._sender_pid == os.getpid():
                return
            self._sender_pid = os.getpid()  # a forked child starts a sender of its own
            self._sender = threading.Thread(
                target=self._send_forever, name="event-publisher", daemon=True
            )
            self._sender.start()

    def _send_forever(self) -> None:
        while True:
            time.sleep(self._batch_s)
            if self._queued:
                self.flush()
