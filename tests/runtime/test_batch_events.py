"""Batched messages send task events too, one pair a message (not a record): Flower shows
each settled and counts what the episodes worker processed."""

from __future__ import annotations

import threading
import time

from celery import Celery

import celeryconfig
from tests.support.waiting import wait_for


def _listen(redis_url: str, seen: list[dict], stop: threading.Event) -> None:
    app = Celery(broker=redis_url, set_as_current=False)
    app.config_from_object(celeryconfig)
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        while not stop.is_set():
            try:
                receiver.capture(limit=None, timeout=0.5, wakeup=False)
            except Exception:  # the timeout ends one capture; go on until stopped
                continue


def test_each_batched_message_is_received_then_succeeded_in_task_events(
    workers, submitter, redis_url
):
    seen: list[dict] = []
    stop = threading.Event()
    listener = threading.Thread(target=_listen, args=(redis_url, seen, stop), daemon=True)
    listener.start()
    time.sleep(1.0)  # bound to the event exchange before anything is sent
    try:
        worker = workers.start("episodes")
        single = submitter.submit("episodes.record", {"user_id": "u-ev", "model_type": "m"})
        submitter.submit_many(
            "episodes.record", [{"user_id": "u-ev", "model_type": "m"} for _ in range(5)]
        )

        def succeeded() -> list[dict]:
            return [e for e in seen if e.get("type") == "task-succeeded"]

        def both() -> bool:
            done = {e.get("uuid") for e in succeeded()}
            packs = [e for e in succeeded() if e.get("result") == "5 record(s) settled"]
            return single.id in done and bool(packs)

        wait_for(both, timeout=30, what="the two messages' task-succeeded events")
    finally:
        stop.set()
        listener.join(5)
    ours = [e for e in seen if e.get("hostname") == worker.hostname]
    kinds = {(e["type"], e.get("uuid")) for e in ours}
    assert ("task-received", single.id) in kinds and ("task-succeeded", single.id) in kinds
    results = {(e.get("uuid"), e["result"]) for e in ours if e["type"] == "task-succeeded"}
    assert (single.id, "1 record(s) settled") in results
    # The pack travels under its own message id: one event pair for its five records.
    assert "5 record(s) settled" in {result for _, result in results}
