"""The job wrapper's plain parts: what ends a job once its work is done."""

from __future__ import annotations

import redis

from workers.runtime import context
from workers.runtime.context import JobContext
from workers.runtime.job import complete


class _RefusingPublisher:
    def publish(self, *args: object, **kwargs: object) -> int:
        raise redis.ConnectionError("Redis went away after the work was done")


def test_finished_work_is_not_turned_into_a_failure_by_its_event(monkeypatch):
    monkeypatch.setattr(context, "publisher", lambda: _RefusingPublisher())
    ctx = JobContext("job-1", "maintenance.ping", 0, "maintenance")
    envelope = complete(ctx, {"pong": "x"})
    assert envelope["success"] is True and envelope["data"] == {"pong": "x"}
    assert envelope["request_id"] == "job-1"
