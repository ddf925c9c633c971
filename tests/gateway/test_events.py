"""A job's events through a real gateway process, over real SSE and WebSocket connections:
every event once, in order; the full history for a late subscriber; an exact resume with
Last-Event-ID; an explicit gap where the capped stream dropped events; a slow WebSocket client
that loses events to a gap marker while a fast one beside it gets every one."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from websockets.sync.client import connect

from conveyor import jobindex, keys
from tests.support.sse import messages, read_all
from tests.support.waiting import wait_for
from workers.gateway.streams import EventHub, Feed
from workers.runtime.events import EventPublisher

pytestmark = pytest.mark.timeout(120)


def _submit_ping(gateway, hold_s: float) -> str:
    response = httpx.post(
        f"{gateway.url}/api/v1/jobs",
        json={"task": "maintenance.ping", "payload": {"message": "events", "hold_s": hold_s}},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()["data"]["job_id"]


def _events_url(gateway, job_id: str) -> str:
    return f"{gateway.url}/api/v1/jobs/{job_id}/events"


def _assert_whole(events: list[dict]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert events[0]["event"] == "maintenance_start"
    assert events[-1]["type"] == "complete" and events[-1]["event"] == "maintenance_complete"
    assert all(e["type"] == "update" for e in events[:-1])


def test_every_event_arrives_in_order_and_the_stream_ends_after_the_last(gateway, ping_worker):
    job_id = _submit_ping(gateway, hold_s=2)
    got = read_all(_events_url(gateway, job_id))  # returns only because the server ends it
    assert [m.id for m in got] == [str(m.seq) for m in got]
    _assert_whole([m.data for m in got])
    assert len(got) >= 4  # start, two progress, complete
    assert all(m.data["job_id"] == job_id for m in got)
    assert all(m.data.get("request_id") for m in got), "the request id travels with the events"

    late = read_all(_events_url(gateway, job_id))  # a late subscriber: the whole history
    assert [m.data for m in late] == [m.data for m in got]


def test_a_reconnect_with_last_event_id_resumes_with_no_gap_and_no_duplicate(gateway, ping_worker):
    job_id = _submit_ping(gateway, hold_s=3)
    first: list[dict] = []
    with httpx.stream("GET", _events_url(gateway, job_id), timeout=30) as response:
        for message in messages(response):
            first.append(message.data)
            if message.seq == 2:
                break  # the connection drops mid-stream
    rest = read_all(_events_url(gateway, job_id), headers={"Last-Event-ID": "2"})
    _assert_whole(first + [m.data for m in rest])
    assert rest[0].seq == 3
    # After the end, a reconnect is told there is nothing more (EventSource stops on 204).
    last = str(rest[-1].seq)
    after_end = httpx.get(_events_url(gateway, job_id), headers={"Last-Event-ID": last})
    assert after_end.status_code == 204
    by_query = read_all(f"{_events_url(gateway, job_id)}?from_seq=3")
    assert [m.seq for m in by_query] == [m.seq for m in rest][1:]
    bad = httpx.get(_events_url(gateway, job_id), headers={"Last-Event-ID": "two"})
    assert bad.status_code == 400


def _fake_job(redis_client, job_id: str) -> None:
    """An indexed job of no tenant whose events a test publishes itself."""
    pipe = redis_client.pipeline()
    jobindex.record(pipe, "maintenance.ping", [job_id], None, ttl_s=600)
    pipe.execute()


def _publish(redis_url: str, job_id: str, count: int, *, maxlen: int, size: int = 10) -> None:
    client = redis.Redis.from_url(redis_url)
    publisher = EventPublisher(client, stream_maxlen=maxlen, ttl_s=600)
    for n in range(1, count + 1):
        last = n == count
        publisher.publish(
            job_id,
            type="complete" if last else "update",
            component="maintenance",
            event="maintenance_complete" if last else "maintenance_progress",
            data={"n": n, "pad": secrets.token_urlsafe(size)[:size]},  # WebSocket compresses
        )
    client.close()


def test_a_gone_sse_client_leaves_no_subscription_behind(gateway, redis_client):
    other = str(uuid.uuid4())
    _fake_job(redis_client, other)
    channel = keys.events_channel(other)
    with httpx.stream("GET", _events_url(gateway, other), timeout=30) as response:
        lines = response.iter_lines()  # held: a dropped iterator closes the response
        assert next(lines) == "retry: 2000"  # connected, subscribed and confirmed
        time.sleep(0.3)
        assert redis_client.pubsub_numsub(channel)[0][1] == 1
    wait_for(
        lambda: redis_client.pubsub_numsub(channel)[0][1] == 0,
        timeout=10,
        what="the gone client's subscription to end",
    )


def test_events_trimmed_from_the_stream_come_as_one_gap_event(gateway, redis_client, redis_url):
    job_id = str(uuid.uuid4())
    _fake_job(redis_client, job_id)
    _publish(redis_url, job_id, 400, maxlen=10)  # "~ 10": Redis trims whole nodes of 100
    got = read_all(_events_url(gateway, job_id))
    assert got[0].event == "gap", got[0]
    gap = got[0].data
    assert gap["from_seq"] == 1 and gap["job_id"] == job_id
    seqs = [m.seq for m in got[1:]]
    assert seqs == list(range(gap["to_seq"] + 1, 401)), (gap, seqs[:5])
    assert got[-1].data["type"] == "complete"


def test_one_websocket_follows_many_jobs_and_a_component(gateway, ping_worker):
    ws_url = gateway.url.replace("http", "ws", 1) + "/api/v1/ws"
    with connect(ws_url, open_timeout=10) as ws:
        ws.send(json.dumps({"op": "subscribe", "component": "maintenance"}))
        assert json.loads(ws.recv(10)) == {"control": "subscribed", "component": "maintenance"}
        jobs = [_submit_ping(gateway, hold_s=1) for _ in range(2)]
        for job_id in jobs:
            ws.send(json.dumps({"op": "subscribe", "job_id": job_id, "from_seq": 0}))
        ws.send(json.dumps({"op": "dance"}))
        by_job: dict[str, list[dict]] = {j: [] for j in jobs}
        controls = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            e and e[-1]["type"] == "complete" for e in by_job.values()
        ):
            message = json.loads(ws.recv(30))
            if "control" in message:
                controls.append(message)
            else:
                by_job.setdefault(message["job_id"], []).append(message)
        for job_id in jobs:
            _assert_whole(by_job[job_id])
        assert {"control": "subscribed", "job_id": jobs[0]} in controls
        assert any(c["control"] == "problem" for c in controls)
        # The firehose: a job nobody subscribed to by id still shows, live.
        third = _submit_ping(gateway, hold_s=0)
        seen = []
        while not seen or seen[-1]["type"] != "complete":
            message = json.loads(ws.recv(30))
            if message.get("job_id") == third:
                seen.append(message)
        assert seen[-1]["event"] == "maintenance_complete"


def test_a_slow_websocket_client_gets_a_gap_and_never_stalls_a_fast_one(
    gateway, redis_client, redis_url
):
    job_id = str(uuid.uuid4())
    _fake_job(redis_client, job_id)
    ws_url = gateway.url.replace("http", "ws", 1) + "/api/v1/ws"
    subscribe = json.dumps({"op": "subscribe", "job_id": job_id})
    # x 10 KB: beyond what the sockets and the 1000-event buffer hold, and under the 32 MB a
    # Redis keeps for a pub/sub subscriber before it drops the connection.
    count = 2000
    # The slow client's socket takes 64 KB (no autotuning to 32 MB): what it does not read
    # waits in the gateway, whose buffer for it holds 1000 events.
    small = socket.create_connection(("127.0.0.1", gateway.port))
    small.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    with (
        connect(ws_url, sock=small, open_timeout=10, max_queue=4) as slow,
        connect(ws_url, open_timeout=10) as fast,
    ):
        for ws in (slow, fast):
            ws.send(subscribe)
            assert json.loads(ws.recv(10))["control"] == "subscribed"
        fast_seqs: list[int] = []
        fast_done = threading.Event()

        def read_fast() -> None:
            while True:
                message = json.loads(fast.recv(60))
                if "seq" in message:
                    fast_seqs.append(message["seq"])
                if message.get("type") == "complete":
                    fast_done.set()
                    return

        reader = threading.Thread(target=read_fast, daemon=True)
        reader.start()
        started = time.monotonic()
        _publish(redis_url, job_id, count, maxlen=10_000, size=10_000)
        assert fast_done.wait(60), f"the fast client got {len(fast_seqs)} of {count}"
        fast_took = time.monotonic() - started
        # Only now does the slow client read: what it gets is in order, with gaps marked.
        slow_seqs: list[int] = []
        gaps = []
        while True:
            message = json.loads(slow.recv(30))
            if message.get("control") == "gap":
                gaps.append(message)
                slow_seqs += range(message["from_seq"], message["to_seq"] + 1)
            elif "seq" in message:
                slow_seqs.append(message["seq"])
            if slow_seqs and slow_seqs[-1] == count:  # the end came as an event, or in a gap
                break
    assert fast_seqs == list(range(1, count + 1)), "the fast client lost or reordered events"
    assert gaps, "the slow client's buffer never overflowed: the test proves nothing"
    assert slow_seqs == list(range(1, count + 1)), "events or gaps out of order"
    assert fast_took < 60


def test_a_feed_that_overflows_past_the_terminal_event_ends_with_the_gap(redis_client, redis_url):
    """The bounded buffer of one client (here 10 events), read only after 50 were published:
    what it could not hold becomes one gap marker, and as the terminal event was in it, the
    follower ends (an SSE stream closes, a WebSocket subscription is done)."""
    job_id = str(uuid.uuid4())
    _fake_job(redis_client, job_id)

    async def run() -> list[dict]:
        client = aioredis.Redis.from_url(redis_url)
        hub = EventHub(client, job_tenant=lambda job: None)
        await hub.start()
        feed = Feed(hub, None, buffer=10)
        try:
            assert await feed.follow(job_id, 0) == []
            await asyncio.to_thread(_publish, redis_url, job_id, 50, maxlen=1000)
            await asyncio.sleep(0.5)  # the hub offers all 50; the feed keeps 10
            out: list[dict] = []
            while job_id in feed.followers:
                out += await feed.next(1.0) or []
            return out
        finally:
            await feed.close()
            await hub.stop()
            await client.aclose()

    out = asyncio.run(run())
    assert [e["seq"] for e in out if "seq" in e] == list(range(1, 11))
    assert out[-1] == {"control": "gap", "job_id": job_id, "from_seq": 11, "to_seq": 50}
