"""Following jobs' events for SSE and WebSocket clients, thousands per process.

One Redis pub/sub connection per gateway process carries every followed job's channel (and,
while someone wants a component's firehose, the pattern of all channels); ``EventHub`` fans
each event out to the ``Feed`` of every client that follows it. A feed replays a job's stream
first, then takes live events through ``conveyor.streams.Follower``, so each event reaches a
client once and in ``seq`` order: a hole in the live feed (a reconnect, a lost message) is
filled from the stream, a stretch trimmed from the stream becomes one gap marker.

A client's buffer is bounded (``client_buffer``): a reader too slow for its events loses the
newest to a gap marker, and never holds up the others or grows the process without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from conveyor import keys
from conveyor.envelopes import FAMILIES, TERMINAL_TYPES
from conveyor.streams import Follower, decode, gap

log = logging.getLogger(__name__)

#: Components a firehose may name (``*``: all of them).
COMPONENTS = frozenset(component for component, _ in FAMILIES.values())

#: Seconds to wait for Redis to confirm a subscription before replaying the stream.
_CONFIRM_S = 5.0
#: Seconds between two looks of an idle feed at its jobs' streams for events the live feed
#: lost (besides one after every reconnect of the hub's pub/sub connection).
CATCH_UP_S = 60.0
#: Events handed to a connection at once.
_SLICE = 64
#: Entries read from a job's stream at most (its cap is CONVEYOR_EVENT_STREAM_MAXLEN).
_HISTORY_MAX = 100_000


class Feed:
    """One client's events: those of the jobs it follows and of the components it watches."""

    def __init__(self, hub: EventHub, tenant: str | None, buffer: int, *, refill: bool = False):
        self.hub = hub
        self.tenant = tenant
        #: What the buffer dropped is read again from the job's stream (an SSE client, one
        #: job: at most the stream's cap at a time) rather than given up for a gap marker (a
        #: WebSocket client of many jobs and firehoses).
        self._refill = refill
        self._buffer = buffer
        self._items: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        #: job id -> (lowest, highest) seq dropped while the buffer was full, and whether the
        #: job's terminal event was among them (its follower ends with the gap then).
        self._dropped: dict[str, tuple[int, int, bool]] = {}
        #: When this feed last looked for events its live feed missed (``_catch_up``), and the
        #: hub's reconnect count then.
        self._checked_at = time.monotonic()
        self._checked_generation = hub.generation
        #: A subscription Redis did not confirm: until live events flow, every quiet spell
        #: reads the streams (a job followed is never left waiting for the catch-up period).
        self._suspect = False
        self.followers: dict[str, Follower] = {}
        self.components: set[str] = set()
        #: job id -> (first, last) seq this client got from a firehose: following that job
        #: later replays the rest, not those, so no event reaches one connection twice.
        self._fired: dict[str, tuple[int, int]] = {}

    # -- fed by the hub ----------------------------------------------------------------------

    def offer(self, event: dict[str, Any]) -> None:
        if len(self._items) >= self._buffer:
            job_id, seq = str(event.get("job_id")), int(event.get("seq", 0))
            low, high, ended = self._dropped.get(job_id, (seq, seq, False))
            terminal = event.get("type") in TERMINAL_TYPES
            self._dropped[job_id] = (min(low, seq), max(high, seq), ended or terminal)
        else:
            self._items.append(event)
        self._wake.set()

    # -- used by the connection --------------------------------------------------------------

    async def follow(self, job_id: str, after_seq: int) -> list[dict[str, Any]]:
        """Start following a job; what its stream holds after ``after_seq``, to send first."""
        low, high = self._fired.pop(job_id, (0, -1))
        follower = self.followers[job_id] = Follower(job_id, after_seq)
        if not await self.hub.watch(job_id, self):
            self._suspect = True  # not confirmed: read the stream at every quiet spell
        replayed = follower.replay(await self.hub.history(job_id))
        self._end_if_done(job_id, follower)
        return [e for e in replayed if not low <= int(e.get("seq", 0)) <= high]

    async def unfollow(self, job_id: str) -> None:
        if self.followers.pop(job_id, None) is not None:
            await self.hub.unwatch(job_id, self)

    async def watch_component(self, component: str) -> None:
        self.components.add(component)
        await self.hub.watch_firehose(self)

    async def next(self, wait_s: float) -> list[dict[str, Any]] | None:
        """What to send next, in order; None when nothing came within ``wait_s`` (then any
        followed job whose stream moved on without us is read again)."""
        if not self._items and not self._dropped:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait_s)
            except TimeoutError:
                caught_up = await self._catch_up()
                return caught_up or None
        out: list[dict[str, Any]] = []
        # A slice at a time: what waits for a slow client stays in the bounded buffer (where
        # the newest overflow to a gap), not in a list of our own.
        for _ in range(min(len(self._items), _SLICE)):
            event = self._items.popleft()
            out += await self._deliver(event)
        if self._items:
            return out  # the gaps come once everything before them is out
        for job_id, (low, high, ended) in list(self._dropped.items()):
            del self._dropped[job_id]
            follower = self.followers.get(job_id)
            if follower is None:
                out.append(gap(job_id, low, high))
            elif self._refill:
                out += follower.replay(await self.hub.history(job_id))
                self._end_if_done(job_id, follower)
            else:
                out += follower.skip(high, ended=ended)
                self._end_if_done(job_id, follower)
        return out

    async def close(self) -> None:
        for job_id in list(self.followers):
            await self.unfollow(job_id)
        if self.components:
            self.components.clear()
            await self.hub.unwatch_firehose(self)

    # -- internals ---------------------------------------------------------------------------

    async def _deliver(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        job_id = str(event.get("job_id"))
        follower = self.followers.get(job_id)
        self._suspect = False  # live events flow
        if follower is None:  # a firehose event of a job this client does not follow
            if not self._wants(event):
                return []
            seq = int(event.get("seq", 0))
            first, last = self._fired.get(job_id, (seq, 0))
            if seq <= last:
                return []  # the pattern and a channel both carried it
            if len(self._fired) > 10_000:
                self._fired.clear()
            self._fired[job_id] = (min(first, seq), seq)
            return [event]
        out = follower.live(event)
        if follower.missing:  # the live feed skipped some: the stream has them
            out += follower.replay(await self.hub.history(job_id))
        self._end_if_done(job_id, follower)
        return out

    def _wants(self, event: dict[str, Any]) -> bool:
        return "*" in self.components or event.get("component") in self.components

    def _end_if_done(self, job_id: str, follower: Follower) -> None:
        if follower.ended:
            self.followers.pop(job_id, None)
            self.hub.unwatch_soon(job_id, self)

    async def _catch_up(self) -> list[dict[str, Any]]:
        """A quiet spell after the hub reconnected (or every ``CATCH_UP_S`` anyway): a
        followed job whose stream went past what we delivered lost a live event (its terminal
        one, perhaps); deliver from the stream. Not at every keep-alive: ten thousand idle
        streams would ask Redis hundreds of times a second for nothing."""
        out: list[dict[str, Any]] = []
        now = time.monotonic()
        if (
            not self._suspect
            and self.hub.generation == self._checked_generation
            and now - self._checked_at < CATCH_UP_S
        ):
            return out
        self._checked_at, self._checked_generation = now, self.hub.generation
        if not self.followers:
            return out
        latest = await self.hub.latest_seqs(list(self.followers))
        for job_id, seq in latest.items():
            follower = self.followers.get(job_id)
            if follower is not None and seq > follower.last_seq:
                out += follower.replay(await self.hub.history(job_id))
                self._end_if_done(job_id, follower)
        return out


class EventHub:
    """The process's one pub/sub connection, shared by every feed."""

    def __init__(self, client: aioredis.Redis, job_tenant: Any, *, redis_url: str | None = None):
        self._client = client
        # The pub/sub connection must not reconnect behind our back (redis-py retries by
        # default): after Redis drops a subscriber that fell behind, a silent reconnect left
        # channels unsubscribed. Without retries the error reaches _read_forever, which makes
        # a new connection, subscribes every channel again and bumps ``generation``.
        self._pubsub_client = (
            aioredis.Redis.from_url(
                redis_url, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)
            )
            if redis_url
            else client
        )
        #: async (job_id) -> tenant or None: whose job an event is (for the firehose).
        self._job_tenant = job_tenant
        self._pubsub: Any = None
        self._jobs: dict[str, set[Feed]] = {}
        self._firehose: set[Feed] = set()
        self._confirmed: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tenants: dict[str, str | None] = {}
        #: Bumped whenever the pub/sub connection is made anew: whatever was published
        #: meanwhile reached no feed, and each feed reads its streams again.
        self.generation = 0

    async def start(self) -> None:
        self._pubsub = self._pubsub_client.pubsub()
        self._reader = asyncio.create_task(self._read_forever(), name="event-hub")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if self._pubsub_client is not self._client:
            with contextlib.suppress(Exception):
                await self._pubsub_client.aclose()

    @property
    def followed_jobs(self) -> int:
        return len(self._jobs)

    async def watch(self, job_id: str, feed: Feed) -> bool:
        """Subscribe ``feed`` to the job's channel; whether Redis confirmed the subscription
        (within ``_CONFIRM_S``)."""
        channel = keys.events_channel(job_id)
        async with self._lock:
            feeds = self._jobs.setdefault(job_id, set())
            feeds.add(feed)
            if len(feeds) > 1:
                confirmed = self._confirmed.get(channel)
            else:
                confirmed = self._confirmed[channel] = asyncio.Event()
                try:
                    await self._pubsub.subscribe(channel)
                    self._subscribed.set()
                except (redis.exceptions.RedisError, OSError) as exc:
                    # The connection is gone: the reader makes a new one, which subscribes
                    # every followed job's channel, this one included.
                    log.warning("event hub: could not subscribe to %s: %s", channel, exc)
                    confirmed = None
        if confirmed is None:
            return False
        # Replaying before Redis confirms could miss an event published in between.
        try:
            await asyncio.wait_for(confirmed.wait(), _CONFIRM_S)
        except TimeoutError:
            return False
        return True

    async def unwatch(self, job_id: str, feed: Feed) -> None:
        async with self._lock:
            feeds = self._jobs.get(job_id)
            if feeds is None:
                return
            feeds.discard(feed)
            if not feeds:
                del self._jobs[job_id]
                channel = keys.events_channel(job_id)
                self._confirmed.pop(channel, None)
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    await self._pubsub.unsubscribe(channel)

    def unwatch_soon(self, job_id: str, feed: Feed) -> None:
        task = asyncio.ensure_future(self.unwatch(job_id, feed))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def watch_firehose(self, feed: Feed) -> None:
        async with self._lock:
            first = not self._firehose
            self._firehose.add(feed)
            if first:
                await self._pubsub.psubscribe(keys.EVENTS_PATTERN)
                self._subscribed.set()

    async def unwatch_firehose(self, feed: Feed) -> None:
        async with self._lock:
            self._firehose.discard(feed)
            if not self._firehose:
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    await self._pubsub.punsubscribe(keys.EVENTS_PATTERN)

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        entries: Any = await self._client.xrange(
            keys.events_stream(job_id), "-", "+", count=_HISTORY_MAX
        )
        return [decode(fields) for _, fields in entries]

    async def latest_seqs(self, job_ids: Iterable[str]) -> dict[str, int]:
        ids = list(job_ids)
        pipe = self._client.pipeline(transaction=False)
        for job_id in ids:
            pipe.xrevrange(keys.events_stream(job_id), "+", "-", count=1)
        replies = await pipe.execute()
        latest = {}
        for job_id, entries in zip(ids, replies, strict=True):
            if entries:
                latest[job_id] = int(decode(entries[0][1]).get("seq", 0))
        return latest

    # -- the reader --------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._subscribed.wait()
                if self._pubsub.connection is None:
                    if self._jobs or self._firehose:  # lost, and a resubscribe failed
                        raise ConnectionError("the pub/sub connection is not up")
                    await asyncio.sleep(0.05)  # no subscription made yet, or none left
                    continue
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
                if message is not None:
                    await self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: reconnect and subscribe everything again
                log.warning("event hub: %s; reconnecting in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                await self._resubscribe()

    async def _resubscribe(self) -> None:
        async with self._lock:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = self._pubsub_client.pubsub()
            channels = [keys.events_channel(job_id) for job_id in self._jobs]
            with contextlib.suppress(Exception):
                if channels:
                    await self._pubsub.subscribe(*channels)
                if self._firehose:
                    await self._pubsub.psubscribe(keys.EVENTS_PATTERN)
            self.generation += 1
        # Whatever was published meanwhile is in the streams: feeds find the hole by seq,
        # or at their next quiet spell (Feed._catch_up).

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == "subscribe":
            confirmed = self._confirmed.get(str(channel))
            if confirmed is not None:
                confirmed.set()
            return
        if kind not in ("message", "pmessage"):
            return
        try:
            event = json.loads(message["data"])
            job_id = str(event["job_id"])
        except (ValueError, KeyError, TypeError):
            log.warning("event hub: an event that is not an envelope on %s", channel)
            return
        if kind == "message":
            for feed in list(self._jobs.get(job_id, ())):
                feed.offer(event)
            return
        # The firehose: only feeds of the job's own tenant, and not twice to a follower.
        watchers = [f for f in self._firehose if job_id not in f.followers]
        if not watchers:
            return
        tenant = await self._tenant_of(job_id) if any(f.tenant for f in watchers) else None
        for feed in watchers:
            if feed.tenant is None or feed.tenant == tenant:  # None: the operator's feed
                feed.offer(event)

    async def _tenant_of(self, job_id: str) -> str | None:
        """Whose job it is (cached: a job never changes hands)."""
        if job_id in self._tenants:
            return self._tenants[job_id]
        tenant = await self._job_tenant(job_id)
        if tenant is not None:  # not yet indexed: ask again next time
            if len(self._tenants) > 50_000:
                self._tenants.clear()
            self._tenants[job_id] = tenant
        return tenant
