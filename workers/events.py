"""Publishing job events: one envelope (DESIGN.md), to a pub/sub channel for live listeners
and to a capped stream for late ones, numbered by a per-job ``seq``.

All three writes and the numbering happen in one Lua script, so ``seq`` order is stream order
even when several threads or processes publish events of one job.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from conveyor import keys
from conveyor.envelopes import EventType, utc_now_iso

# KEYS[1] seq counter, KEYS[2] stream, KEYS[3] channel
# ARGV[1] envelope JSON up to and including '"seq":', ARGV[2] the rest after the number,
# ARGV[3] stream max length (approximate), ARGV[4] TTL in seconds of the stream and counter.
_PUBLISH = """
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local event = ARGV[1] .. seq .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', event)
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', KEYS[3], event)
return seq
"""


class EventPublisher:
    """Publishes the events of jobs to Redis; safe to share between threads."""

    def __init__(self, client: redis.Redis, *, stream_maxlen: int, ttl_s: int):
        self._script = client.register_script(_PUBLISH)
        self._maxlen = stream_maxlen
        self._ttl = ttl_s

    def publish(
        self, job_id: str, *, type: EventType, component: str, event: str, data: dict[str, Any]
    ) -> int:
        """Publish one event; returns its ``seq``."""
        head = (
            f'{{"type":{json.dumps(type)},"component":{json.dumps(component)},'
            f'"event":{json.dumps(event)},"job_id":{json.dumps(job_id)},"seq":'
        )
        tail = f',"data":{json.dumps(data, default=str)},"timestamp":"{utc_now_iso()}"}}'
        keys_ = [keys.events_seq(job_id), keys.events_stream(job_id), keys.events_channel(job_id)]
        return int(self._script(keys=keys_, args=[head, tail, self._maxlen, self._ttl]))
