"""EventPublisher against the suite's real Redis: numbering, the envelope on both the stream
and the pub/sub channel, the order of queued (``publish_soon``) events, the stream's cap and
TTL, and numbering under several publishing threads."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime

import pytest

from conveyor import keys
from tests.support.waiting import wait_for
from workers.runtime.events import EventPublisher

ENVELOPE_FIELDS = ["type", "component", "event", "job_id", "seq", "data", "timestamp"]
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def publisher(redis_client) -> EventPublisher:
    # A long batch interval: queued events go only when a test sends them.
    return EventPublisher(redis_client, stream_maxlen=1000, ttl_s=60, batch_s=30.0)


def stream_events(redis_client, job_id: str) -> list[dict]:
    """The job's events as the stream holds them, oldest first."""
    return [
        json.loads(fields[b"event"])
        for _id, fields in redis_client.xrange(keys.events_stream(job_id))
    ]


def progress(publisher: EventPublisher, job_id: str, n: int, *, soon: bool = False) -> int | None:
    send = publisher.publish_soon if soon else publisher.publish
    return send(
        job_id, type="update", component="ai", event="ai_generation_progress", data={"n": n}
    )


def subscribed(redis_client, job_id: str):
    """A pub/sub subscribed to the job's channel, confirmed by the server before returning."""
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.events_channel(job_id))
    confirmation = pubsub.get_message(timeout=5)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    return pubsub


def channel_events(pubsub, count: int) -> list[tuple[bytes, dict]]:
    """The next ``count`` messages of the channel: raw bytes and parsed JSON."""
    got = []
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == "message":
            got.append((message["data"], json.loads(message["data"])))
    assert len(got) == count, f"got {len(got)} of {count} messages on the channel"
    return got


def test_seq_counts_from_one_per_job_in_stream_order(publisher, redis_client, unique):
    job_a, job_b = f"job-a-{unique}", f"job-b-{unique}"
    returned_a = [progress(publisher, job_a, 0)]
    returned_b = []
    for n in range(1, 5):
        returned_a.append(progress(publisher, job_a, n))
        if n % 2:
            returned_b.append(progress(publisher, job_b, n))

    assert returned_a == [1, 2, 3, 4, 5]
    assert returned_b == [1, 2]  # another job's counter is its own
    events_a = stream_events(redis_client, job_a)
    assert [e["seq"] for e in events_a] == [1, 2, 3, 4, 5]
    assert [e["data"]["n"] for e in events_a] == [0, 1, 2, 3, 4]
    assert [e["seq"] for e in stream_events(redis_client, job_b)] == [1, 2]
    assert int(redis_client.get(keys.events_seq(job_a))) == 5


def test_the_envelope_lands_on_the_stream_and_the_channel(publisher, redis_client, unique):
    job_id = f"job-{unique}"
    when = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    pubsub = subscribed(redis_client, job_id)
    try:
        before = datetime.now(UTC).replace(microsecond=0)
        seq = publisher.publish(
            job_id,
            type="complete",
            component="workflow",
            event="workflow_execution_complete",
            data={"rows": [1, 2], "note": 'quote " and ünïcode', "at": when},
        )
        after = datetime.now(UTC)
        [(raw, live)] = channel_events(pubsub, 1)
    finally:
        pubsub.close()

    [(_id, fields)] = redis_client.xrange(keys.events_stream(job_id))
    assert fields[b"event"] == raw  # the very same bytes on both
    assert seq == 1
    assert list(live) == ENVELOPE_FIELDS
    assert live["type"] == "complete"
    assert live["component"] == "workflow"
    assert live["event"] == "workflow_execution_complete"
    assert live["job_id"] == job_id
    assert live["seq"] == 1
    # What JSON cannot hold goes as its str.
    assert live["data"] == {"rows": [1, 2], "note": 'quote " and ünïcode', "at": str(when)}
    assert ISO_MS_Z.match(live["timestamp"]), live["timestamp"]
    stamped = datetime.strptime(live["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= stamped <= after


def test_queued_events_go_before_a_later_publish_of_their_job(publisher, redis_client, unique):
    job_id, other = f"job-{unique}", f"other-{unique}"
    pubsub = subscribed(redis_client, job_id)
    try:
        for n in range(3):
            progress(publisher, job_id, n, soon=True)
        progress(publisher, other, 0, soon=True)
        assert redis_client.xlen(keys.events_stream(job_id)) == 0  # still queued

        seq = progress(publisher, job_id, 3)
        live = [event for _raw, event in channel_events(pubsub, 4)]
    finally:
        pubsub.close()

    assert seq == 4
    stored = stream_events(redis_client, job_id)
    assert [(e["seq"], e["data"]["n"]) for e in stored] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    assert [(e["seq"], e["data"]["n"]) for e in live] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    # publish took only its own job's queued events; the other job's wait for the batch.
    assert redis_client.xlen(keys.events_stream(other)) == 0
    publisher.flush()
    assert [e["seq"] for e in stream_events(redis_client, other)] == [1]
    # and the job's events were taken off the queue, not sent twice.
    assert len(stream_events(redis_client, job_id)) == 4


def test_queued_events_are_sent_by_the_batch_thread_within_batch_s(redis_client, unique):
    publisher = EventPublisher(redis_client, stream_maxlen=1000, ttl_s=60, batch_s=0.02)
    job_id = f"job-{unique}"
    for n in range(5):
        progress(publisher, job_id, n, soon=True)

    wait_for(
        lambda: redis_client.xlen(keys.events_stream(job_id)) == 5,
        timeout=2,
        interval=0.01,
        what="the batch thread sending queued events",
    )
    assert [(e["seq"], e["data"]["n"]) for e in stream_events(redis_client, job_id)] == [
        (n + 1, n) for n in range(5)
    ]


def test_the_stream_is_capped_keeping_the_newest(redis_client, unique):
    maxlen, total = 10, 600
    publisher = EventPublisher(redis_client, stream_maxlen=maxlen, ttl_s=60, batch_s=30.0)
    job_id = f"job-{unique}"
    for n in range(total):
        progress(publisher, job_id, n, soon=True)
    publisher.flush()  # 600 events in 3 script calls of one round trip

    # MAXLEN ~ trims whole stream nodes: at most one node's worth above the cap is kept.
    node_entries = int(
        redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"]
    )
    stored = stream_events(redis_client, job_id)
    assert maxlen <= len(stored) <= maxlen + node_entries < total
    assert stored[-1]["seq"] == total  # the newest are kept ...
    seqs = [e["seq"] for e in stored]
    assert seqs == list(range(total - len(stored) + 1, total + 1))  # ... contiguous, in order
    assert int(redis_client.get(keys.events_seq(job_id))) == total  # numbering goes on


def test_the_stream_and_counter_carry_the_ttl(redis_client, unique):
    publisher = EventPublisher(redis_client, stream_maxlen=100, ttl_s=40, batch_s=30.0)
    job_id = f"job-{unique}"
    redis_client.set(keys.events_seq(job_id), 0)  # no TTL of its own yet
    progress(publisher, job_id, 0)

    for key in (keys.events_stream(job_id), keys.events_seq(job_id)):
        assert 30 < redis_client.ttl(key) <= 40, key
    # Every event refreshes the TTL.
    redis_client.expire(keys.events_stream(job_id), 5)
    redis_client.expire(keys.events_seq(job_id), 5)
    progress(publisher, job_id, 1)
    for key in (keys.events_stream(job_id), keys.events_seq(job_id)):
        assert 30 < redis_client.ttl(key) <= 40, key


def test_a_short_ttl_really_expires_the_stream_and_restarts_numbering(redis_client, unique):
    publisher = EventPublisher(redis_client, stream_maxlen=100, ttl_s=1, batch_s=30.0)
    job_id = f"job-{unique}"
    progress(publisher, job_id, 0)
    assert redis_client.exists(keys.events_stream(job_id), keys.events_seq(job_id)) == 2
    wait_for(
        lambda: redis_client.exists(keys.events_stream(job_id), keys.events_seq(job_id)) == 0,
        timeout=3,
        interval=0.05,
        what="the job's event keys expiring",
    )
    assert progress(publisher, job_id, 1) == 1


def test_threads_publishing_for_one_job_get_gap_free_unique_seq(publisher, redis_client, unique):
    job_id = f"job-{unique}"
    threads_n, per_thread = 8, 40
    returned: list[int] = []
    returned_lock = threading.Lock()
    start = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                data = {"t": t, "i": i}
                if i % 3 == 2:  # every third event queued, sent by a later publish or flush
                    publisher.publish_soon(
                        job_id, type="update", component="ai", event="e", data=data
                    )
                    continue
                seq = publisher.publish(job_id, type="update", component="ai", event="e", data=data)
                with returned_lock:
                    returned.append(seq)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    publisher.flush()
    assert not errors

    total = threads_n * per_thread
    stored = stream_events(redis_client, job_id)
    assert [e["seq"] for e in stored] == list(range(1, total + 1))  # no gap, no repeat
    assert len(returned) == len(set(returned))
    assert set(returned) <= set(range(1, total + 1))
    # Every event made it exactly once.
    assert sorted((e["data"]["t"], e["data"]["i"]) for e in stored) == [
        (t, i) for t in range(threads_n) for i in range(per_thread)
    ]
    # The seq each publish returned is the seq its event carries in the stream.
    by_seq = {e["seq"]: e["data"] for e in stored}
    assert all(by_seq[seq]["i"] % 3 != 2 for seq in returned)
